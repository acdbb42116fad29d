"""VQ-GAN training objective: VQ / codebook losses, codebook remedies and metrics, and
``VQGANLoss`` on a real VQ-GAN (the GAN losses, discriminator and LPIPS: test_gan_parts.py).
Expected values are hand-computed or come from a second, independent implementation written
here."""

from __future__ import annotations

import pytest
import torch
from comfyui_sundae.sundae_lib.vq_losses import (
    CodebookEMA,
    DeadCodeRestart,
    VQGANLoss,
    VQLossConfig,
    codebook_commitment_loss,
    codebook_usage,
    lookup_codes,
    nearest_codes,
    perplexity,
    reconstruction_loss,
    straight_through,
    vq_losses,
)
from comfyui_sundae.sundae_lib.vqgan import VQGAN, VQGANConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# reconstruction and quantization
# ---------------------------------------------------------------------------------------------


def test_reconstruction_loss_hand_values():
    a = torch.tensor([0.0, 1.0, -1.0, 0.5]).reshape(1, 1, 2, 2)
    b = torch.tensor([1.0, 1.0, 0.0, -0.5]).reshape(1, 1, 2, 2)
    assert reconstruction_loss(a, b).item() == pytest.approx((1 + 0 + 1 + 1) / 4)
    assert reconstruction_loss(a, b, kind="l2").item() == pytest.approx((1 + 0 + 1 + 1) / 4)
    c = torch.tensor([2.0, 1.0, -1.0, 0.5]).reshape(1, 1, 2, 2)
    assert reconstruction_loss(a, c, kind="l2").item() == pytest.approx(4 / 4)
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        reconstruction_loss(a, b, kind="huber")
    with pytest.raises(ValueError, match="shape"):
        reconstruction_loss(a, b[..., :1])


def _hand_example():
    """z_e vectors (1, 0) and (0, 2) on a 1×2 grid; codes (0,0), (1,1), (0,3).
    (1,0) is at squared distance 1 from both code 0 and code 1 (tie -> first index, 0);
    (0,2) is nearest to code 2 (distance 1)."""
    z_e = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).T.reshape(1, 2, 1, 2).clone().requires_grad_(True)
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 3.0]], requires_grad=True)
    return z_e, codebook


def test_nearest_codes_tie_and_brute_force():
    z_e, codebook = _hand_example()
    assert nearest_codes(z_e, codebook).tolist() == [[[0, 2]]]
    # brute force over random data
    z = torch.randn(2, 4, 3, 5)
    cb = torch.randn(7, 4)
    tokens = nearest_codes(z, cb)
    assert tokens.shape == (2, 3, 5) and tokens.dtype == torch.int64
    for b in range(2):
        for i in range(3):
            for j in range(5):
                d = [float(((z[b, :, i, j] - cb[k]) ** 2).sum()) for k in range(7)]
                assert tokens[b, i, j].item() == min(range(7), key=lambda k: d[k])


def test_beta_on_commitment_term_hand_computed():
    """loss = ‖sg[z_e] − z_q‖² + β‖z_e − sg[z_q]‖² (means over the 4 elements). Residuals
    z_q − z_e: (−1, 0) and (0, +1), so both terms are 2/4 = 0.5."""
    beta = 0.25
    z_e, codebook = _hand_example()
    z_q_st, loss, tokens = vq_losses(z_e, codebook, beta)
    assert tokens.tolist() == [[[0, 2]]]
    assert loss.item() == pytest.approx(0.5 + beta * 0.5)
    # forward value of the straight-through codes is the codes
    assert torch.equal(z_q_st.detach(), torch.tensor([[0.0, 0.0], [0.0, 3.0]]).T.reshape(1, 2, 1, 2))
    loss.backward()
    # codebook gradient: codebook term only, 2(z_q − z_e)/4, weight 1 (not β)
    assert torch.allclose(codebook.grad, torch.tensor([[-0.5, 0.0], [0.0, 0.0], [0.0, 0.5]]))
    # encoder gradient: commitment term only, β·2(z_e − z_q)/4
    expected_ze = torch.tensor([[0.125, 0.0], [0.0, -0.125]]).T.reshape(1, 2, 1, 2)
    assert torch.allclose(z_e.grad, expected_ze)
    # taming's legacy placement would give codebook grads × β and encoder grads × 1/β here
    assert not torch.allclose(codebook.grad, beta * torch.tensor([[-0.5, 0.0], [0.0, 0.0], [0.0, 0.5]]))


def test_codebook_and_commitment_terms_separately():
    z_e, codebook = _hand_example()
    z_q = lookup_codes(nearest_codes(z_e, codebook), codebook)
    total, cb_term, commit = codebook_commitment_loss(z_e, z_q, beta=0.5)
    cb_term.backward(retain_graph=True)
    assert z_e.grad is None and codebook.grad is not None  # codebook term moves codes only
    codebook.grad = None
    commit.backward()
    assert codebook.grad is None and z_e.grad is not None  # commitment moves the encoder only
    # EMA codebooks: no codebook-term gradient at all
    z_e2, codebook2 = _hand_example()
    _, loss, _ = vq_losses(z_e2, codebook2, 0.25, codebook_term=False)
    loss.backward()
    assert codebook2.grad is None
    assert loss.item() == pytest.approx(0.25 * 0.5)


def test_straight_through_passes_decoder_gradient_to_encoder():
    z_e, codebook = _hand_example()
    z_q_st, _, _ = vq_losses(z_e, codebook, 0.25)
    weight = torch.tensor([3.0, -2.0, 5.0, 7.0]).reshape(1, 2, 1, 2)
    (z_q_st * weight).sum().backward()  # a linear "decoder"
    assert torch.equal(z_e.grad, weight)  # identity Jacobian through the estimator
    assert codebook.grad is None  # the straight-through path never reaches the codebook
    x = torch.randn(3, requires_grad=True)
    y = straight_through(x, torch.zeros(3))
    assert torch.equal(y, torch.zeros(3))
    y.pow(2).sum().backward()  # d/dy y² at y = 0 is 0, passed through unchanged
    assert torch.equal(x.grad, torch.zeros(3))


def test_vq_losses_shapes_and_dtype():
    z = torch.randn(2, 8, 4, 6, requires_grad=True)
    cb = torch.randn(32, 8, requires_grad=True)
    z_q, loss, tokens = vq_losses(z, cb, 0.25)
    assert z_q.shape == z.shape and loss.shape == () and tokens.shape == (2, 4, 6)
    assert tokens.dtype == torch.int64 and 0 <= int(tokens.min()) and int(tokens.max()) < 32
    with pytest.raises(ValueError, match="embed_dim"):
        vq_losses(torch.randn(2, 4, 4, 6), cb, 0.25)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def test_usage_and_perplexity_on_known_histograms():
    uniform = torch.arange(8).repeat(5).reshape(2, 4, 5)
    assert perplexity(uniform, 8).item() == pytest.approx(8.0, rel=1e-5)
    assert codebook_usage(uniform, 8).item() == pytest.approx(1.0)
    single = torch.full((2, 3, 3), 5)
    assert perplexity(single, 8).item() == pytest.approx(1.0)
    assert codebook_usage(single, 8).item() == pytest.approx(1 / 8)
    # counts (2, 1, 1, 0): p = (1/2, 1/4, 1/4) -> entropy 1.5 bits -> perplexity 2^1.5
    mixed = torch.tensor([[[0, 0, 1, 2]]])
    assert perplexity(mixed, 4).item() == pytest.approx(2**1.5, rel=1e-5)
    assert codebook_usage(mixed, 4).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="0..3"):
        codebook_usage(torch.tensor([[[4]]]), 4)


# ---------------------------------------------------------------------------------------------
# codebook remedies
# ---------------------------------------------------------------------------------------------


def _collapsed_batch():
    """16 codes; every latent sits near codes 0 or 1; codes 2..15 are far away (unused)."""
    codebook = torch.cat([torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.full((14, 2), 100.0)])
    z_e = torch.randn(2, 2, 4, 4) * 0.5
    return codebook, z_e


def test_dead_codes_are_restarted_from_batch_encodings():
    codebook, z_e = _collapsed_batch()
    tokens = nearest_codes(z_e, codebook)
    used_before = codebook_usage(tokens, 16).item()
    assert used_before <= 2 / 16
    restart = DeadCodeRestart(16, decay=0.0, threshold=0.01).train()
    dead = restart.update(codebook, z_e, tokens, generator=torch.Generator().manual_seed(3))
    unused = sorted(set(range(16)) - set(tokens.unique().tolist()))
    assert sorted(dead.tolist()) == unused
    rows = z_e.permute(0, 2, 3, 1).reshape(-1, 2)  # independent flattening
    for k in unused:
        matches = (rows == codebook[k]).all(dim=1)
        assert matches.any(), f"code {k} is not a batch encoding"
    revived = codebook[unused]
    assert torch.unique(revived, dim=0).shape[0] == len(unused)  # distinct vectors (no replacement)
    after = codebook_usage(nearest_codes(z_e, codebook), 16).item()
    assert after > used_before + 0.5
    assert torch.all(restart.usage[unused] == 1.0)
    # same generator seed -> same restart
    codebook2, _ = _collapsed_batch()
    DeadCodeRestart(16, decay=0.0).update(codebook2, z_e, tokens, generator=torch.Generator().manual_seed(3))
    assert torch.equal(codebook, codebook2)


def test_restart_grace_period_and_eval_noop():
    codebook, z_e = _collapsed_batch()
    tokens = nearest_codes(z_e, codebook)
    restart = DeadCodeRestart(16, decay=0.99, threshold=0.01)
    # log(0.01)/log(0.99) = 458.2: unused codes survive 458 updates and die on the 459th
    for _ in range(458):
        assert restart.update(codebook.clone(), z_e, tokens).numel() == 0
    assert restart.update(codebook.clone(), z_e, tokens).numel() == 14
    restart.eval()
    frozen = DeadCodeRestart(16, decay=0.0).eval()
    before = codebook.clone()
    assert frozen.update(codebook, z_e, tokens).numel() == 0 and torch.equal(codebook, before)


def test_ema_update_matches_hand_formula_and_moves_toward_means():
    codebook = torch.tensor([[0.0, 0.0], [4.0, 4.0], [9.0, 9.0]])
    # two vectors assigned to code 0, one to code 1, none to code 2
    z_e = torch.tensor([[1.0, 1.0], [3.0, 1.0], [5.0, 5.0]]).T.reshape(1, 2, 1, 3)
    tokens = torch.tensor([[[0, 0, 1]]])
    ema = CodebookEMA(3, 2, decay=0.5, eps=1e-5)
    old = codebook.clone()
    ema.update(codebook, z_e, tokens)
    # by hand: sizes 0.5·1 + 0.5·(2, 1, 0) = (1.5, 1.0, 0.5); n = 3
    sizes = torch.tensor([1.5, 1.0, 0.5])
    sums = torch.tensor([[4.0, 2.0], [5.0, 5.0], [0.0, 0.0]])
    avg = 0.5 * old + 0.5 * sums
    smoothed = (sizes + 1e-5) / (3 + 3 * 1e-5) * 3
    assert torch.allclose(codebook, avg / smoothed[:, None], atol=1e-6)
    means = torch.tensor([[2.0, 1.0], [5.0, 5.0]])
    assert torch.all((codebook[:2] - means).norm(dim=1) < (old[:2] - means).norm(dim=1))
    # an unused code keeps its place (up to the Laplace smoothing)
    assert torch.allclose(codebook[2], old[2], atol=1e-3)


def test_ema_is_online_kmeans_and_eval_is_noop():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 3.0]])
    codebook = centres + torch.tensor([[0.8, 0.5], [-0.6, 0.7], [0.5, -0.9]])
    ema = CodebookEMA(3, 2, decay=0.8)
    for _ in range(60):
        pts = centres[torch.randint(0, 3, (64,), generator=gen)] + 0.1 * torch.randn(64, 2, generator=gen)
        z_e = pts.T.reshape(1, 2, 8, 8)
        ema.update(codebook, z_e, nearest_codes(z_e, codebook))
    assert torch.allclose(codebook, centres, atol=0.06)
    ema.eval()
    before = codebook.clone()
    ema.update(codebook, torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    assert torch.equal(codebook, before)


def test_restart_keeps_ema_statistics_consistent():
    codebook, z_e = _collapsed_batch()
    ema = CodebookEMA(16, 2, decay=0.9)
    tokens = nearest_codes(z_e, codebook)
    ema.update(codebook, z_e, tokens)
    dead = DeadCodeRestart(16, decay=0.0).update(codebook, z_e, tokens, ema=ema)
    assert dead.numel() == 14
    revived = codebook[dead].clone()
    ema.update(codebook, z_e, nearest_codes(z_e, codebook))  # revived codes stay near their vectors
    assert (codebook[dead] - revived).abs().max() < 1.0


# ---------------------------------------------------------------------------------------------
# the combined loss on the real VQ-GAN
# ---------------------------------------------------------------------------------------------


def _tiny_vqgan():
    return VQGAN(VQGANConfig.preset("tiny"))


def test_vq_losses_agree_with_vqgan_quantizer():
    vqgan = _tiny_vqgan()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = vqgan(x)
    codebook = vqgan.quantize.embedding.weight
    z_q_st, loss, tokens = vq_losses(out.latent, codebook, 0.25)
    assert torch.equal(tokens, out.tokens)
    assert torch.equal(tokens, vqgan.quantize(out.latent)[1])
    assert torch.allclose(z_q_st, out.quantized, atol=1e-5)  # z_e + (z_q − z_e) rounds
    ref, _, _ = codebook_commitment_loss(out.latent, out.quantized, beta=0.25)
    assert loss.item() == pytest.approx(ref.item())
    loss_mod = VQGANLoss(VQLossConfig(beta=0.25, disc_ndf=8, disc_num_layers=2))
    assert loss_mod.vq_loss(out.latent, out.quantized).item() == pytest.approx(loss.item())


def _loss_and_batch(**overrides):
    torch.manual_seed(0)
    vqgan = _tiny_vqgan()
    cfg = VQLossConfig(**{"disc_start": 0, "disc_ndf": 8, "disc_num_layers": 2, **overrides})
    loss_mod = VQGANLoss(cfg, n_embed=32, embed_dim=8)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    return vqgan, loss_mod, x


def test_generator_step_gives_no_grads_to_discriminator():
    vqgan, loss_mod, x = _loss_and_batch()
    z_q, q_loss, _ = loss_mod.quantize(vqgan.encode_to_latent(x), vqgan.quantize.embedding.weight)
    recon = vqgan.decode_codes(z_q)
    loss, log = loss_mod.generator_step(x, recon, q_loss, 5, last_layer=vqgan.last_layer)
    loss.backward()
    assert all(p.grad is None for p in loss_mod.discriminator.parameters())
    assert all(p.requires_grad for p in loss_mod.discriminator.parameters())  # restored
    assert vqgan.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vqgan.quantize.embedding.weight.grad.abs().sum() > 0
    assert log["train/g_loss"].item() != 0.0 and log["train/disc_factor"].item() == 1.0


def test_generator_step_total_and_adaptive_weight_by_hand():
    vqgan, loss_mod, x = _loss_and_batch(perceptual_weight=0.0, codebook_weight=0.7, disc_weight=0.3)
    z_q, q_loss, _ = loss_mod.quantize(vqgan.encode_to_latent(x), vqgan.quantize.embedding.weight)
    recon = vqgan.decode_codes(z_q)
    loss, log = loss_mod.generator_step(x, recon, q_loss, 5, last_layer=vqgan.last_layer)
    # independent recomputation
    nll = (x - recon).abs().mean()
    g = -loss_mod.discriminator(recon).mean()
    gn = torch.autograd.grad(nll, vqgan.last_layer, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, vqgan.last_layer, retain_graph=True)[0].norm()
    d_weight = (gn / (gg + 1e-4)).clamp(0, 1e4) * 0.3
    assert log["train/d_weight"].item() == pytest.approx(d_weight.item(), rel=1e-4)
    expected = nll + d_weight * g + 0.7 * q_loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="last_layer"):
        loss_mod.generator_step(x, recon, q_loss, 5)


def test_discriminator_step_gives_no_grads_to_generator():
    vqgan, loss_mod, x = _loss_and_batch()
    recon = vqgan(x).recon
    d_loss, log = loss_mod.discriminator_step(x, recon, 5)
    d_loss.backward()
    assert all(p.grad is None for p in vqgan.parameters())
    assert sum(p.grad.abs().sum() for p in loss_mod.discriminator.parameters()) > 0
    assert set(log) == {"train/disc_loss", "train/logits_real", "train/logits_fake"}


def test_before_disc_start_gan_term_is_off():
    vqgan, loss_mod, x = _loss_and_batch(disc_start=100)
    calls = []
    loss_mod.discriminator.register_forward_hook(lambda *a: calls.append(1))
    z_q, q_loss, _ = loss_mod.quantize(vqgan.encode_to_latent(x), vqgan.quantize.embedding.weight)
    recon = vqgan.decode_codes(z_q)
    loss, log = loss_mod.generator_step(x, recon, q_loss, 99, last_layer=vqgan.last_layer)
    assert calls == [] and log["train/g_loss"].item() == 0.0 and log["train/disc_factor"].item() == 0.0
    assert loss.item() == pytest.approx(((x - recon).abs().mean() + q_loss).item(), rel=1e-6)
    d_loss, _ = loss_mod.discriminator_step(x, recon, 99)
    assert d_loss.item() == 0.0


def test_codebook_step_ema_restart_and_training_state_round_trip():
    vqgan, loss_mod, x = _loss_and_batch(codebook_remedy="ema+restart", restart_decay=0.0)
    codebook = vqgan.quantize.embedding.weight
    z_e = vqgan.encode_to_latent(x)
    _, q_loss, tokens = loss_mod.quantize(z_e, codebook)
    q_loss.backward()  # EMA codebook: the VQ loss is β·commitment only
    assert codebook.grad is None and q_loss.requires_grad
    log = loss_mod.codebook_step(codebook, z_e.detach(), tokens, generator=torch.Generator().manual_seed(0))
    unused = 32 - len(tokens.unique())
    assert log["train/codes_restarted"].item() == unused
    usage_after = codebook_usage(nearest_codes(z_e, codebook), 32).item()
    assert usage_after > log["train/codebook_usage"].item()
    state = loss_mod.training_state()
    assert any(k.startswith("ema.") for k in state) and any(k.startswith("restart.") for k in state)
    assert any(k.startswith("discriminator.main.") for k in state)
    fresh = VQGANLoss(loss_mod.config, n_embed=32, embed_dim=8)
    fresh.load_training_state(state)
    assert all(torch.equal(state[k], v) for k, v in fresh.training_state().items())
    with pytest.raises(ValueError, match="unexpected keys"):
        VQGANLoss(VQLossConfig(disc_ndf=8, disc_num_layers=2)).load_training_state(state)


def test_config_validation():
    with pytest.raises(ValueError, match="disc_loss"):
        VQLossConfig(disc_loss="wasserstein")
    with pytest.raises(ValueError, match="codebook_remedy"):
        VQLossConfig(codebook_remedy="kmeans")
    with pytest.raises(ValueError, match="beta"):
        VQLossConfig(beta=-1.0)
    with pytest.raises(ValueError, match="disc_start"):
        VQLossConfig(disc_start=1.5)
    with pytest.raises(ValueError, match="ema_decay"):
        VQLossConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="valid keys"):
        VQLossConfig.from_dict({"disc_weigth": 0.5})
    assert VQLossConfig.from_dict({"disc_weight": 0.5}).disc_weight == 0.5
    with pytest.raises(ValueError, match="n_embed"):
        VQGANLoss(VQLossConfig(codebook_remedy="restart"))


# ---------------------------------------------------------------------------------------------
# a small real task
# ---------------------------------------------------------------------------------------------


def _train_tiny_vqgan_on_mnist(mnist, remedy: str, steps: int = 12):
    """A few steps of autoencoder training on real digits (no GAN / LPIPS: too slow for CI)."""
    images = torch.from_numpy(mnist[0][:640]).float().div(127.5).sub(1.0).unsqueeze(1)
    torch.manual_seed(0)
    cfg = VQGANConfig.preset(
        "tiny", in_channels=1, out_ch=1, resolution=28, attn_resolutions=(), mid_attention=False
    )
    vqgan = VQGAN(cfg)
    loss_cfg = VQLossConfig(
        codebook_remedy=remedy, restart_decay=0.5, restart_threshold=0.1,
        perceptual_weight=0.0, disc_start=10**9, disc_in_channels=1, disc_ndf=8,
    )
    loss_mod = VQGANLoss(loss_cfg, n_embed=cfg.n_embed, embed_dim=cfg.embed_dim).train()
    opt = torch.optim.Adam(vqgan.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    rec = []
    for step in range(steps):
        x = images[torch.randint(0, 512, (8,), generator=gen)]
        z_e = vqgan.encode_to_latent(x)
        codebook = vqgan.quantize.embedding.weight
        z_q, q_loss, tokens = loss_mod.quantize(z_e, codebook)
        loss, log = loss_mod.generator_step(x, vqgan.decode_codes(z_q), q_loss, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_mod.codebook_step(codebook, z_e.detach(), tokens, generator=gen)
        rec.append(log["train/rec_loss"].item())
    with torch.no_grad():
        tokens = vqgan.encode(images[512:])  # digits not seen in training
    return rec, codebook_usage(tokens, cfg.n_embed).item(), perplexity(tokens, cfg.n_embed).item()


def test_dead_code_restart_raises_codebook_usage_on_mnist(mnist):
    rec_none, usage_none, ppl_none = _train_tiny_vqgan_on_mnist(mnist, "none")
    rec_restart, usage_restart, ppl_restart = _train_tiny_vqgan_on_mnist(mnist, "restart")
    for rec in (rec_none, rec_restart):  # both learn to reconstruct
        assert rec[-1] < 0.6 * rec[0]
    # measured: usage 0.66 -> 1.0, perplexity 6.9 -> 21 on held-back digits
    assert usage_restart > usage_none + 0.15
    assert ppl_restart > 1.5 * ppl_none
