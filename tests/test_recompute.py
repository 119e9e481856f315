"""Gradient checkpointing block by block (headsurgeon.recompute, HeadTree.set_grad_checkpointing)."""
import torch
from torch import fx, nn

from headsurgeon import recompute, split
from headsurgeon.objectives import get
from headsurgeon.verify import tolerance  # in_dtype, float64: 84 ulps of the largest entry (at least 1)


def test_block_checkpointing_gives_the_same_gradients_and_cuts_at_blocks():
    tree = split("resnet18", at=["layer3", "layer4"], heads=4, num_classes=5, input_size=(3, 32, 32),
                 channels=[8, 16, 32, 64], drop_path_rate=0.1).double().train()
    # trunk: stem | layer1.0 | layer1.1 | layer2.0 | layer2.1; each branch: one piece per block
    assert [len(recompute.pieces(s) or []) for s in (tree.levels[0][0], tree.levels[1][0], tree.levels[2][0])] == [5, 2, 2]
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    keys, n_params = list(tree.state_dict()), len(list(tree.parameters()))

    def grads(on):
        tree.set_grad_checkpointing(on)
        tree.zero_grad()
        torch.manual_seed(3)  # drop-path: checkpointing replays the RNG, so both runs drop the same paths
        get("cl")(tree(x), y).loss.backward()
        return {n: p.grad.clone() for n, p in tree.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 20
    for n in plain:  # float64: the replayed forward is the same; the heads' gradients may add in another order
        torch.testing.assert_close(ckpt[n], plain[n], rtol=0, atol=tolerance(plain[n], in_dtype=True))
    # the pieces share the segments' parameters and are not registered: names and weights unchanged
    assert list(tree.state_dict()) == keys and len(list(tree.parameters())) == n_params


class _Block(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        self.act, self.conv = nn.ReLU(inplace=inplace), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):  # the block's first module call starts its piece: here it writes into the input
        return self.conv(self.act(x))


class _Net(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(_Block(inplace), _Block(inplace))

    def forward(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))


def test_pieces_that_write_into_their_input_are_found():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for inplace in (False, True):
        torch.manual_seed(0)
        gm = fx.symbolic_trace(_Net(inplace).double())
        parts = recompute.pieces(gm)
        assert len(parts) == 3  # stem | blocks.0 | blocks.1
        with torch.no_grad():
            assert recompute.mutates_input(parts, x.clone()) is inplace
        if not inplace:  # the checkpointed pieces give the plain gradients
            gm(x).sum().backward()
            plain = [p.grad.clone() for p in gm.parameters()]
            gm.zero_grad()
            recompute.run(parts, x).sum().backward()
            for a, p in zip(plain, gm.parameters()):  # float64, one chain: the same ops replayed
                torch.testing.assert_close(p.grad, a, rtol=0, atol=tolerance(a, in_dtype=True))
