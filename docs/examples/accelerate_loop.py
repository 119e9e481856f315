"""CollaborativeTask under HF Accelerate (one process here; `accelerate launch` for several)."""
import sys

import timm
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from timm.optim import create_optimizer_v2

import headsurgeon as hs
from plain_loop import digits_loaders  # the digits loaders of the plain-loop example


def main(directory="accelerate-model", objective="pcl", epochs=2):
    train_loader, test_loader = digits_loaders()
    tree = hs.split("resnet10t", at=["layer3"], heads=4, num_classes=10, in_chans=1,
                    channels=[16, 32, 64, 128], stem_width=16, input_size=(1, 16, 16))
    task = hs.CollaborativeTask(tree, objective)
    optimizer = create_optimizer_v2(task, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    # DDP must be told when the model registers weights its forward never reads; cpu=True: drop it to use the
    # GPUs `accelerate launch` gives
    ddp = DistributedDataParallelKwargs(find_unused_parameters=task.find_unused_parameters)
    accelerator = Accelerator(cpu=True, kwargs_handlers=[ddp])
    task, optimizer, train_loader = accelerator.prepare(task, optimizer, train_loader)
    plain = accelerator.unwrap_model(task)
    for epoch in range(epochs):
        task.train()
        plain.set_epoch(epoch)
        for x, y in train_loader:
            out = task(x, y)
            optimizer.zero_grad()
            accelerator.backward(out.loss)
            optimizer.step()
            plain.after_step()
    acc = plain.evaluate(test_loader)
    best = max(range(tree.num_heads), key=lambda h: acc["heads"][h]["top1"])
    if accelerator.is_main_process:
        hs.export(plain.collapse(best), directory)
    return timm.create_model(f"local-dir:{directory}", pretrained=True)


if __name__ == "__main__":
    main(*sys.argv[1:2])
