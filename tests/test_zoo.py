"""Exactness across timm families: split at two points into 4 heads, train one step, collapse
every head (logits equal to the tree's), and with copied branches every head equals eager."""
import pytest
import timm
import torch
import torch.nn.functional as F

import headsurgeon as hs
from headsurgeon.verify import max_abs_diff, tolerance

# (name, input side, extra create kwargs). Small inputs where the model allows; a few big
# architectures are shrunk through kwargs (the kwargs travel in model_args, so collapse rebuilds them).
ZOO = [
    ("resnet10t", 32, {}),
    ("resnext26ts", 32, {}),
    ("seresnext26d_32x4d", 32, {}),
    ("convnext_atto", 32, {}),
    ("efficientnet_b0", 32, {}),
    ("mobilenetv3_small_050", 32, {}),
    ("mobilenetv4_conv_small", 32, {}),
    ("regnetx_002", 32, {}),
    ("regnety_002", 32, {}),
    ("densenet121", 32, {}),
    ("inception_v3", 75, {}),
    ("vit_tiny_patch16_224", 32, {"drop_path_rate": 0.1}),
    ("deit_tiny_distilled_patch16_224", 32, {}),
    ("beit_base_patch16_224", 32, {"depth": 4, "embed_dim": 64, "num_heads": 2}),
    ("eva02_tiny_patch14_224", 28, {}),
    ("swin_tiny_patch4_window7_224", 56, {"window_size": 7}),
    ("mixer_s16_224", 32, {}),
    ("levit_128s", 64, {}),
    ("efficientformer_l1", 224, {}),
    ("fastvit_t8", 32, {}),
    ("maxvit_nano_rw_256", 64, {}),
    ("hrnet_w18_small", 64, {}),
    ("dla34", 32, {}),
    ("dpn68", 32, {}),
    ("xception41", 64, {}),
    ("rexnet_100", 32, {}),
    ("ghostnet_100", 32, {}),
    ("repvit_m1", 32, {}),
    ("tiny_vit_5m_224", 64, {}),
    ("mobilevitv2_050", 64, {}),
    ("coat_lite_tiny", 64, {}),
    ("caformer_s18", 32, {}),
    ("edgenext_xx_small", 64, {}),
    ("pit_ti_224", 64, {}),
    ("xcit_nano_12_p16_224", 32, {}),
    ("cait_xxs24_224", 32, {}),
    ("crossvit_tiny_240", 240, {}),
    ("selecsls42b", 32, {}),
    ("nf_resnet26", 32, {}),
    ("efficientvit_b0", 64, {}),
    ("coatnet_0_rw_224", 64, {}),
    ("hiera_tiny_224", 64, {}),
    # list-valued kwargs, as the coverage sweep's reduced builds of the 1-7 B models pass them
    ("davit_tiny", 32, {"depths": [1, 1, 1, 1], "embed_dims": [32, 64, 128, 256], "num_heads": [1, 2, 4, 8]}),
    ("vit_base_patch16_sapiens2", 32, {"depth": 2, "num_kv_heads": [12, 6], "embed_dim": 96, "num_heads": 12}),
]


def _create(name, size, kw):
    try:
        return timm.create_model(name, num_classes=5, img_size=size, **kw)
    except TypeError:  # convnets take no img_size
        return timm.create_model(name, num_classes=5, **kw)


@pytest.mark.parametrize("name,size,kw", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_split_train_collapse(name, size, kw):
    model = _create(name, size, kw)
    insz = (model.pretrained_cfg["input_size"][0], size, size)
    at = [f["module"] for f in model.feature_info][-2:]
    x = torch.randn(4, *insz)

    # Copied branches: every head is the eager model. In float32, as users and the coverage sweep run these
    # families (in float64 some keep parts in float32: sapiens2's RoPE tables), within verify.tolerance:
    # 84 float32 ulps of the largest logit (at least 1), as split's own check.
    copy_tree = hs.split(model, at=at, heads=4, branch_init="copy", input_size=insz).eval()
    with torch.no_grad():
        ref = model.eval()(x)
        for out in copy_tree(x):
            assert max_abs_diff(out, ref) <= tolerance(ref)

    # Independent branches: one training step, then every head collapses exactly.
    tree = hs.split(model, at=at, heads=4, branch_init="independent", seed=1, input_size=insz)
    tree.train()
    opt = torch.optim.SGD(tree.parameters(), lr=0.01)
    y = torch.randint(0, 5, (4,))
    loss = sum(F.cross_entropy(z if torch.is_tensor(z) else z[0], y) for z in tree(x))
    loss.backward()
    opt.step()
    tree.eval()
    with torch.no_grad():
        outs = tree(x)
        assert max_abs_diff(outs[0], outs[3]) > 0, "independent heads should differ"
        for h in range(4):
            collapsed = hs.collapse(tree, h)
            assert type(collapsed) is type(model)
            assert max_abs_diff(collapsed(x), outs[h]) <= tolerance(outs[h])
