"""The DALI loader: CPU pipelines here, GPU operators where CUDA exists; same order as the DataLoader fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_testing import INDEX_STEP, decode_indices

from dfm.data import build_latent_loader, dali, use_dali
from dfm.data.store import LATENT_SCALE, open_store, write_store

pytestmark = pytest.mark.skipif(dali.pipeline_def is None, reason="needs nvidia.dali")


def take(loader, n_batches: int):
    it = iter(loader)
    return [next(it) for _ in range(n_batches)]


def rows_of(x: torch.Tensor, means: np.ndarray) -> np.ndarray:
    """Store row of each sample of a std=0 batch: the row whose scaled mean it equals (exactly)."""
    flat = means.reshape(len(means), -1) * np.float32(LATENT_SCALE)
    dist = np.abs(x.reshape(len(x), 1, -1).numpy() - flat[None]).max(-1)
    rows = dist.argmin(1)
    assert (dist[np.arange(len(x)), rows] == 0).all()
    return rows


def test_predicate_picks_dali_when_asked(coded_store):
    assert use_dali("dali", "cpu") is True
    assert isinstance(build_latent_loader(coded_store(count=4), 2, loader="dali", num_workers=0), dali.DaliLatentLoader)


def test_dali_and_dataloader_yield_the_same_epoch_on_encoded_latents(tmp_path, prepared):
    # The encoded store with std set to 0: the posterior sample is the scaled mean, so rows can be matched exactly.
    encoded = open_store(prepared)
    moments = np.array(encoded.moments)
    moments[:, 4:] = 0
    root = write_store(tmp_path / "std0", moments, encoded.labels, encoded.num_classes)
    means = moments[:, :4]
    by_position = {}
    for rank in range(2):
        rows = {}
        for kind in ("dali", "torch"):
            loader = build_latent_loader(root, 4, rank, 2, seed=11, loader=kind, num_workers=0)
            batches = take(loader, 2)  # 2 global batches of 8: all 15 samples and the first of epoch two
            xs, ys = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
            assert xs.dtype == torch.float32 and ys.dtype == torch.int64 and xs.shape == (8, 4, 16, 16)
            rows[kind] = rows_of(xs, means)
            np.testing.assert_array_equal(ys.numpy(), encoded.labels[rows[kind]])
        np.testing.assert_array_equal(rows["dali"], rows["torch"])  # the same samples, in the same order
        for k in range(2):
            by_position[loader.stream.micro_start(0, k)] = rows["dali"][4 * k : 4 * k + 4]
    order = np.concatenate([by_position[p] for p in sorted(by_position)])
    assert sorted(order[:15].tolist()) == list(range(encoded.count))  # the ranks split the epoch, disjoint, covering


def test_dali_resumes_mid_epoch_in_order(coded_store):
    root = coded_store(count=23, std=0.5)
    full = take(build_latent_loader(root, 4, 1, 2, seed=4, loader="dali", num_workers=0), 6)
    order = np.concatenate([decode_indices(x) for x, _ in full])
    first = build_latent_loader(root, 4, 1, 2, seed=4, loader="dali", num_workers=0)
    take(first, 2)  # mid-epoch: 2 global batches of 8, 16 of 23 samples
    state = first.state_dict()
    assert (state["epoch"], state["position"], state["samples_seen"]) == (0, 16, 16)
    resumed = build_latent_loader(root, 4, 1, 2, seed=4, loader="dali", num_workers=0)
    resumed.load_state_dict(state)
    rest = take(resumed, 4)
    np.testing.assert_array_equal(np.concatenate([decode_indices(x) for x, _ in rest]), order[8:])
    np.testing.assert_array_equal(torch.cat([y for _, y in rest]).numpy(), order[8:] % 5)
    assert resumed.state_dict()["samples_seen"] == 48


def test_dali_posterior_noise_is_standard_normal_and_seeded(coded_store):
    root = coded_store(count=23, std=0.5)
    a = take(build_latent_loader(root, 8, 0, 1, seed=2, loader="dali", num_workers=0), 3)
    b = take(build_latent_loader(root, 8, 0, 1, seed=2, loader="dali", num_workers=0), 3)
    c = take(build_latent_loader(root, 8, 0, 1, seed=3, loader="dali", num_workers=0), 1)
    for (xa, _), (xb, _) in zip(a, b):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
    assert not torch.equal(a[0][0], c[0][0])
    x = torch.cat([x for x, _ in a]).double()
    idx = torch.from_numpy(decode_indices(x)).view(-1, 1, 1, 1)
    n = (x / LATENT_SCALE - INDEX_STEP * idx) / 0.5
    assert abs(n.mean()) < 4 / n.numel() ** 0.5 and abs(n.std() - 1) < 0.06
    # Channels of one sample get independent noise (not one draw broadcast).
    assert (n[:, 0] - n[:, 1]).abs().max() > 0.5


def test_dali_parallel_external_source_workers(coded_store):
    root = coded_store(count=23, name="par")
    serial = take(build_latent_loader(root, 4, 0, 2, seed=8, loader="dali", num_workers=0), 4)
    parallel = take(build_latent_loader(root, 4, 0, 2, seed=8, loader="dali", num_workers=1), 4)
    for (x, y), (x_ref, y_ref) in zip(parallel, serial):
        torch.testing.assert_close(x, x_ref, rtol=0, atol=0)  # std=0: the order decides everything
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


def test_prepare_encode_dali_train_end_to_end(prepared):
    # convert -> encode (the prepared fixture, through the CLI) -> DALI on the CPU -> DFM-SiT training steps.
    from dfm.models import build_model
    from dfm.objective import DFMObjective

    store = open_store(prepared)
    loader = build_latent_loader(prepared, 5, loader="dali", seed=0, num_workers=0)
    model = build_model(
        "DFM-SiT-S/2", input_size=16, in_channels=store.channels, num_classes=store.num_classes, stages=2,
        depth=2, hidden_size=64, num_heads=2,
    )  # fmt: skip
    objective = DFMObjective(stages=2, stage_weights=[0.5, 0.5], num_classes=store.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _, (x, y) in zip(range(4), loader):  # range first: zip must not pull a 5th batch
        loss = objective.stage_losses(model, x, y, generator=g)[0].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and all(loss > 0 for loss in losses)
    assert sum(not torch.equal(p, q) for p, q in zip(model.parameters(), before)) > len(before) // 2
    assert loader.state_dict()["samples_seen"] == 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dali_gpu_pipeline_matches_cpu_order(coded_store):
    root = coded_store(count=23, std=0.5)
    cpu = take(build_latent_loader(root, 4, 0, 2, seed=6, loader="torch", num_workers=0), 4)
    gpu_loader = build_latent_loader(root, 4, 0, 2, seed=6, device="cuda", num_workers=0)
    assert isinstance(gpu_loader, dali.DaliLatentLoader)  # auto picks DALI on CUDA
    gpu = take(gpu_loader, 4)
    for (x, y), (x_ref, y_ref) in zip(gpu, cpu):
        assert x.is_cuda and y.is_cuda and x.dtype == torch.float32
        np.testing.assert_array_equal(decode_indices(x), decode_indices(x_ref))
        torch.testing.assert_close(y.cpu(), y_ref, rtol=0, atol=0)
