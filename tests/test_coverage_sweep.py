"""The zoo sweep's own logic (benchmarks/coverage.py), on small models: what it picks decides what
docs/coverage.md can claim."""
import importlib.util
from pathlib import Path

from torch import nn

SWEEP = Path(__file__).resolve().parent.parent / "benchmarks" / "coverage.py"
spec = importlib.util.spec_from_file_location("coverage_sweep", SWEEP)
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)


def test_fallback_input_is_the_old_policy_not_the_full_size():
    # run_one passes kwargs that already carry num_classes: creating with num_classes=10 again raised
    # inside the probe, and every fallback ran at the model's full size (efficientnet_l2: 800 px, OOM)
    # resnet10t's own input is 176 px; the old policy for a convnet is half of it within 64-128 px
    assert C._legacy_input("resnet10t", {"num_classes": 10}) == ({"num_classes": 10}, (3, 88, 88))


def test_split_candidates_resolve_names_relative_to_a_wrapper():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    class Wrapped(nn.Module):  # gemma4_vit: feature_info says 'blocks.N', the modules are 'encoder.blocks.N'
        def __init__(self):
            super().__init__()
            self.encoder = Encoder()
            self.feature_info = [{"module": f"blocks.{i}", "num_chs": 4, "reduction": 1} for i in range(3)]

        def forward(self, x):
            for b in self.encoder.blocks:
                x = b(x)
            return x

    assert C._split_candidates(Wrapped()) == ["encoder.blocks.0", "encoder.blocks.1", "encoder.blocks.2"]
    m = Wrapped()
    m.feature_info = [{"module": "block.0"}, {"module": "block.1"}]  # names nothing (Twins): the containers' fallback
    assert C._split_candidates(m) == []
