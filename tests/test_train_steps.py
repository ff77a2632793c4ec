import pytest
import torch

from data_prep.manifest import ShardError
from ncsn.data import random_hflip, to_uint8, to_unit_interval
from ncsn.ema import EMA
from ncsn.models import ModelConfig, ScoreNetwork
from ncsn.sigmas import geometric_sigmas
from ncsn.train import NonFiniteLossError, infinite_batches, train_steps

SIGMAS = geometric_sigmas(1.0, 0.01, 4)


def test_pixel_transforms_round_trip(gen):
    images = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8, generator=gen)
    assert torch.equal(to_uint8(to_unit_interval(images)), images)
    deq = to_unit_interval(images, dequantize=True, generator=gen)
    assert (deq >= images.float() / 256).all() and (deq < (images.float() + 1) / 256).all()
    flipped = random_hflip(to_unit_interval(images), generator=gen)
    for a, b in zip(flipped, to_unit_interval(images)):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    with pytest.raises(ValueError, match="uint8"):
        to_unit_interval(images.float())


def test_ema_tracks_the_average():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(2.0)
    start = ema.model.weight.item()
    ema.update(model)
    assert ema.model.weight.item() == pytest.approx(0.5 * start + 0.5 * 2.0)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_train_steps_yields_stats_and_lowers_the_loss(gen):
    torch.manual_seed(0)
    model = ScoreNetwork(ModelConfig("ncsnv2", 8, 1, 8), SIGMAS)
    ema = EMA(model, 0.9)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    images = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    images[:, :, 2:6, 3:5] = 255  # one bar: an easy data set
    stats = list(train_steps(model, infinite_batches(images, 16, gen), SIGMAS, opt, num_steps=60, ema=ema,
                             grad_clip=1.0, transform=to_unit_interval))
    assert [s.step for s in stats] == list(range(1, 61))
    assert sum(s.loss for s in stats[-10:]) < 0.7 * sum(s.loss for s in stats[:10])
    assert all(s.per_level_count.sum() == 16 and s.images == 16 for s in stats)
    resumed = list(train_steps(model, infinite_batches(images, 16, gen), SIGMAS, opt, num_steps=62, start_step=60,
                               transform=to_unit_interval))
    assert [s.step for s in resumed] == [61, 62]
    with pytest.raises(ValueError, match="dtype torch.uint8 reached the model"):
        next(train_steps(model, infinite_batches(images, 16, gen), SIGMAS, opt, num_steps=1))


def test_sliced_objective_trains_toward_the_denoising_minimiser(gen):
    # SSM and DSM share their minimiser (the perturbed data's score), so training with objective="ssm" must lower the
    # DSM loss measured on fixed noise; an unknown objective is refused before any step.
    from ncsn.losses import dsm_loss

    torch.manual_seed(0)
    model = ScoreNetwork(ModelConfig("ncsn", 8, 1, 8), SIGMAS)
    images = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    images[:, :, 2:6, 3:5] = 255
    x = to_unit_interval(images[:32])

    def held_out_dsm() -> float:
        with torch.no_grad():
            levels = torch.arange(4).repeat(8)
            return dsm_loss(model, x, SIGMAS, levels=levels, generator=torch.Generator().manual_seed(7)).loss.item()

    before = held_out_dsm()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    stats = list(train_steps(model, infinite_batches(images, 16, gen), SIGMAS, opt, num_steps=60, transform=to_unit_interval,
                             objective="ssm"))
    assert len(stats) == 60 and all(s.per_level_count.sum() == 16 for s in stats)
    assert held_out_dsm() < 0.7 * before
    with pytest.raises(ValueError, match="objective must be one of dsm, ssm"):
        next(train_steps(model, infinite_batches(images, 16, gen), SIGMAS, opt, num_steps=1, objective="nce"))


def test_non_finite_loss_stops_before_the_weights_change(gen):
    model = ScoreNetwork(ModelConfig("ncsnv2", 8, 1, 8), SIGMAS)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.rand(4, 1, 8, 8), torch.full((4, 1, 8, 8), float("nan"))]
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 2; non-finite at levels"):
        for s in train_steps(model, batches, SIGMAS, opt, num_steps=5):
            before = {k: v.clone() for k, v in model.state_dict().items()}  # state after the last good step
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _two_gloo_ranks(target, tmp_path, monkeypatch) -> list:
    """What ``target(rank, init, results)`` put on the queue in each of two spawned gloo ranks."""
    import multiprocessing

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=target, args=(rank, f"file://{tmp_path / 'rendezvous'}", results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    try:
        return [results.get(timeout=120) for _ in ranks]
    finally:
        for process in ranks:
            process.join(timeout=30)
            process.kill()


def _train_rank(rank: int, init: str, results) -> None:
    """One of two gloo ranks: rank 1's second batch is NaN; reports the NonFiniteLossError message or None."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model = ScoreNetwork(ModelConfig("ncsnv2", 8, 1, 8), SIGMAS)
        batches = [torch.rand(4, 1, 8, 8), torch.full((4, 1, 8, 8), float("nan") if rank else 0.5)]
        try:
            list(train_steps(model, batches, SIGMAS, torch.optim.SGD(model.parameters(), 0.1), num_steps=2))
            results.put((rank, None))
        except NonFiniteLossError as err:
            results.put((rank, str(err)))
    finally:
        dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_message(tmp_path, monkeypatch):
    # Under torch.distributed the ranks decide together: the rank whose loss is finite stops too (it would otherwise wait
    # in the next all-reduce), naming the levels the other rank saw.
    messages = dict(_two_gloo_ranks(_train_rank, tmp_path, monkeypatch))
    assert messages[0] == messages[1] and messages[0] is not None, messages
    assert messages[0].startswith("loss is nan at step 2; non-finite at levels ")


def test_empty_loader_is_an_error():
    model = ScoreNetwork(ModelConfig("ncsnv2", 8, 1, 8), SIGMAS)
    with pytest.raises(ValueError, match="yielded no batch"):
        list(train_steps(model, [], SIGMAS, torch.optim.SGD(model.parameters(), 0.1), num_steps=1))
    with pytest.raises(ValueError, match="batch_size 8 is larger than the 4 images"):
        next(infinite_batches(torch.zeros(4, 1, 8, 8), 8, torch.Generator()))


def test_metrics_window_averages_the_steps_between_reports_and_starts_again_empty():
    from ncsn.train import StepStats
    from pipelines.train_worker import MetricsWindow

    window = MetricsWindow([1.0, 0.1, 0.01], torch.device("cpu"))
    window.add(StepStats(1, 2.0, torch.tensor([4.0, 0.0, 1.0]), torch.tensor([2.0, 0.0, 1.0]), 0.5, 8))
    window.add(StepStats(2, 4.0, torch.tensor([2.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]), 1.5, 8))
    row = window.row(step=2, world=1, skipped=3)
    assert (row["step"], row["loss"], row["grad_norm"], row["skipped_samples"]) == (2, 3.0, 1.0, 3)
    # each level's chart named by its index (the UI sorts by name) and its σ
    assert row["loss_per_sigma/000_1"] == 2.0 and row["loss_per_sigma/002_0.01"] == 1.0 and "loss_per_sigma/001_0.1" not in row
    assert row["images_per_s"] > 0
    window.reset()
    window.add(StepStats(3, 6.0, torch.tensor([0.0, 3.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), 2.0, 8))
    row = window.row(step=3, world=1, skipped=0)
    assert (row["loss"], row["grad_norm"]) == (6.0, 2.0) and [k for k in row if k.startswith("loss_per")] == ["loss_per_sigma/001_0.1"]


def test_loss_watch_says_once_when_the_loss_rises_far_above_its_lowest():
    # The demo's losses when its network collapsed to a zero score (loss D/2 = 32 on 8×8): a falling loss and a spike
    # that recovers (11.5 against a low of 9.7) say nothing; the collapse says so once, naming both steps.
    from pipelines.train_worker import LossWatch

    watch = LossWatch()
    said = [watch.check(step, loss) for step, loss in [(50, 22.0), (100, 15.8), (1000, 9.7), (1100, 11.5), (1200, 9.1),
                                                       (2150, 9.11), (2200, 25.3), (2250, 32.0)]]
    assert said[:6] == [None] * 6 and said[7] is None
    assert "loss 25.3 at step 2200" in said[6] and "9.1 at step 1200" in said[6] and "optim.grad_clip" in said[6]


class _DamagedLoader:
    """Two epochs of one batch each; on rank 1 the second epoch stops as a damaged shard stops ShardLoader."""

    def __init__(self, rank: int):
        self.rank, self.epoch = rank, 0

    def __iter__(self):
        self.epoch += 1
        if self.rank == 1 and self.epoch == 2:
            raise ShardError("train/shard-000001.tar: its sha256 is …")
        yield torch.full((2, 1, 8, 8), float(self.rank)), torch.zeros(2)


def _agree_rank(rank: int, init: str, results) -> None:
    """One of two gloo ranks drawing agreed_batches from a _DamagedLoader; reports (rank, batches, message)."""
    import torch.distributed as dist

    from pipelines.train_worker import agreed_batches

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    drawn = []
    try:
        for images in agreed_batches(_DamagedLoader(rank), torch.device("cpu")):
            drawn.append(images)
        results.put((rank, len(drawn), None))
    except ShardError as err:
        results.put((rank, len(drawn), str(err)))
    finally:
        dist.destroy_process_group()


def test_a_damaged_shard_on_one_rank_stops_every_rank_at_the_same_batch(tmp_path, monkeypatch):
    # Rank 1's loader fails its sha256 check at the second epoch: rank 0, whose shards are intact, stops at the same
    # batch with rank 1's message instead of waiting for rank 1 in the next gradient all-reduce.
    outcomes = sorted(_two_gloo_ranks(_agree_rank, tmp_path, monkeypatch))
    assert outcomes == [(0, 1, "train/shard-000001.tar: its sha256 is …"), (1, 1, "train/shard-000001.tar: its sha256 is …")]
