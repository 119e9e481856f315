"""A plain PyTorch loop over CollaborativeTask: 4 heads of a narrow timm ResNet, PCL, on digits."""
import sys

import timm
import torch
from sklearn.datasets import load_digits
from timm.optim import create_optimizer_v2

import headsurgeon as hs


def digits_loaders(batch_size=64):
    """scikit-learn's bundled 8x8 digits as 1-channel 16x16 tensors: 1,497 to train on, 300 to test."""
    d = load_digits()
    x = torch.nn.functional.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16, size=16)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    train, test = order[300:], order[:300]
    make = lambda i, shuffle: torch.utils.data.DataLoader(  # noqa: E731
        torch.utils.data.TensorDataset((x[i] - 0.3) / 0.4, y[i]), batch_size=batch_size, shuffle=shuffle, generator=g)
    return make(train, True), make(test, False)


def main(directory="plain-loop-model", objective="pcl", epochs=3):
    train_loader, test_loader = digits_loaders()
    tree = hs.split("resnet10t", at=["layer3"], heads=4, num_classes=10, in_chans=1,
                    channels=[16, 32, 64, 128], stem_width=16, input_size=(1, 16, 16))
    task = hs.CollaborativeTask(tree, objective)  # + the objective's parameters, e.g. ema_decay=0.99 for pcl
    optimizer = create_optimizer_v2(task, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    for epoch in range(epochs):
        task.train()
        task.set_epoch(epoch)  # the objectives' ramp-ups
        for x, y in train_loader:
            out = task(x, y)  # out.loss, out.logits, out.hard, out.soft, out.extra
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            task.after_step()  # pcl: the temporal mean follows the tree
        acc = task.evaluate(test_loader)  # per head and ensemble, of what pcl exports: the temporal mean
        print(f"epoch {epoch}: loss {out.loss.item():.3f}, test top-1 per head "
              f"{[round(h['top1'], 1) for h in acc['heads']]}, ensemble {acc['ensemble']['top1']:.1f}")
    best = max(range(tree.num_heads), key=lambda h: acc["heads"][h]["top1"])  # choose on a validation split
    hs.export(task.collapse(best), directory, label_names=[str(i) for i in range(10)])  # a plain, verified timm model
    return timm.create_model(f"local-dir:{directory}", pretrained=True)


if __name__ == "__main__":
    main(*sys.argv[1:2])
