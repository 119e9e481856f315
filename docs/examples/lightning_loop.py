"""CollaborativeTask inside a PyTorch Lightning LightningModule."""
import sys

import lightning
import timm
from timm.optim import create_optimizer_v2

import headsurgeon as hs
from plain_loop import digits_loaders  # the digits loaders of the plain-loop example


class Collaborative(lightning.LightningModule):
    def __init__(self, tree, objective="one", **params):
        super().__init__()
        self.task = hs.CollaborativeTask(tree, objective, **params)

    def on_train_epoch_start(self):
        self.task.set_epoch(self.current_epoch)

    def training_step(self, batch, batch_idx):
        out = self.task(*batch)
        self.log_dict({"loss": out.loss, **{f"hard/{i}": h for i, h in enumerate(out.hard)}})
        return out.loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.task.after_step()

    def configure_optimizers(self):
        return create_optimizer_v2(self.task, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)


def main(directory="lightning-model", objective="one", epochs=2):
    train_loader, test_loader = digits_loaders()
    tree = hs.split("resnet10t", at=["layer3"], heads=4, num_classes=10, in_chans=1,
                    channels=[16, 32, 64, 128], stem_width=16, input_size=(1, 16, 16))
    module = Collaborative(tree, objective)
    trainer = lightning.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_loader)
    acc = module.task.evaluate(test_loader)
    best = max(range(tree.num_heads), key=lambda h: acc["heads"][h]["top1"])
    hs.export(module.task.collapse(best), directory)
    return timm.create_model(f"local-dir:{directory}", pretrained=True)


if __name__ == "__main__":
    main(*sys.argv[1:2])
