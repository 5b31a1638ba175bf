"""Tests of vqkit's vqvae module."""

from __future__ import annotations

import pytest
import torch

from vqkit.models import VQVAE, VQVAEConfig

SMALL = dict(hidden=32, res_hidden=8, res_layers=1, num_embeddings=32, embedding_dim=8)

K, D = 16, 4


@pytest.mark.parametrize(
    "kind, options, index_shape",
    [
        ("vq", {}, (2, 4, 4)),
        ("ema", {}, (2, 4, 4)),
        ("rvq", {"num_quantizers": 3, "stage": "vq", "quantizer_dropout": 0.5}, (2, 4, 4, 3)),
        ("rvq", {"num_quantizers": 2, "shared_codebook": True}, (2, 4, 4, 2)),
        ("fsq", {"levels": "8,5,5,5"}, (2, 4, 4)),
    ],
)
def test_vqvae_with_each_quantizer(kind, options, index_shape):
    from vqkit.models import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    cfg = VQVAEConfig(
        in_channels=1,
        image_size=16,
        hidden=16,
        res_hidden=8,
        res_layers=1,
        embedding_dim=8,
        quantizer=kind,
        **({} if kind == "fsq" else {"num_embeddings": 32}),
        **options,
    )
    model = VQVAE(cfg)
    x = torch.rand(2, 1, 16, 16) - 0.5
    out = model.train()(x)
    terms = VQVAE.loss(out, x, data_variance=0.1)
    terms["loss"].backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    model.eval()
    idx = model.encode(x)
    assert idx.shape == index_shape and model.index_dims == len(index_shape)
    recon = model.decode(idx)
    torch.testing.assert_close(recon, model(x).recon)
    # the config survives a dict (JSON) round trip and old configs still load
    assert VQVAEConfig.from_dict(cfg.to_dict()) == cfg
    assert VQVAEConfig.from_dict({"quantizer": "ema"}).num_quantizers == 4


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
@pytest.mark.parametrize("kind", ["ema", "vq"])
def test_model_shapes(channels, size, kind):
    m = VQVAE(in_channels=channels, image_size=size, quantizer=kind)
    x = torch.rand(2, channels, size, size) - 0.5
    out = m(x)
    assert out.recon.shape == x.shape
    assert out.vq.indices.shape == (2, size // 4, size // 4)
    idx = m.encode(x)
    assert torch.equal(m.decode(idx), m.decoder(m.quantizer.decode(idx)))
    terms = VQVAE.loss(out, x, 0.06)
    terms["loss"].backward()
    if kind == "vq":
        assert m.quantizer.codebook.grad is not None
    else:
        assert not any(p is m.quantizer.codebook for p in m.parameters())


def test_classic_architecture_details():
    m = VQVAE()  # defaults: h=128, residual hiddens 32, 2 layers, K=512, D=64
    assert m.encoder.conv1.out_channels == 64 and m.encoder.conv1.kernel_size == (4, 4)
    assert m.encoder.conv1.stride == (2, 2) and m.encoder.conv3.kernel_size == (3, 3)
    assert m.pre_vq.kernel_size == (1, 1) and m.pre_vq.out_channels == 64
    assert m.quantizer.num_embeddings == 512 and m.quantizer.commitment_cost == 0.25
    blocks = m.encoder.res.blocks
    assert len(blocks) == 2
    # each residual layer has its own weights (the classic notebook shared one module)
    assert blocks[0].conv3.weight.data_ptr() != blocks[1].conv3.weight.data_ptr()
    assert blocks[0].conv3.bias is None and blocks[0].conv1.bias is None
    assert isinstance(m.decoder.up1, torch.nn.ConvTranspose2d)


def test_model_input_errors():
    m = VQVAE(**SMALL)
    with pytest.raises(ValueError, match="expected 3 image channels; got 1"):
        m(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        m(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        m(torch.zeros(1, 3, 30, 30))
    with pytest.raises(TypeError, match="uint8"):
        m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="image_size"):
        VQVAEConfig(image_size=30)
    with pytest.raises(ValueError, match="quantizer"):
        VQVAEConfig(quantizer="pq")


def test_model_config_rejects_codebook_options_for_fsq():
    from vqkit.models import VQVAEConfig

    with pytest.raises(ValueError, match="codebook_dim"):
        VQVAEConfig(quantizer="fsq", codebook_dim=4)
    with pytest.raises(ValueError, match="affine_codebook"):
        VQVAEConfig(quantizer="ema", affine_codebook=True)
    cfg = VQVAEConfig(quantizer="ema", codebook_dim=4, use_cosine=True)
    from vqkit.models import VQVAE

    m = VQVAE(cfg)
    assert m.quantizer.codebook_dim == 4 and m.quantizer.use_cosine
