"""KID, FID and Inception Score of a sample set against a shard split (or published reference statistics), on features
from torch-fidelity's extractors, in one of two conventions that every report names on its card.

``published`` computes what papers report, as torch-fidelity computes it: FID, IS as the mean ± sd over 10 splits, KID on
raw features as the mean ± sd over 100 subsets of 1000 rows. ``project`` (the default, and tuning's) is built for
comparisons: KID (reported as ``kid_std_<extractor>``) is the unbiased MMD² on features standardised by a fixed scaler (the
training split's per-feature mean and sd), with a 95% interval from its unbiased variance; FID and IS, biased at finite
counts, come with their bootstrap standard deviation at the counts used. Two feature extractors: torch-fidelity's
Inception-v3 (downloaded, or a weights file given by path for air-gapped clusters) and a small CNN classifier trained
once, deterministically, on the labelled training shards (as LeNet features are used for MNIST); its weights digest
versions every cache entry and metric record. Baselines at the same count: real held-out images the score network and
the classifier never saw (what a model indistinguishable from the data scores) and a Gaussian fitted to the training
split (a weak model)."""
from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor
from tqdm import tqdm

from data_prep.loader import make_loader
from data_prep.manifest import Manifest, ShardError, load_manifest
from data_prep.sources import IMAGE_SUFFIXES, ImageFolderSource, SourceError, stratified_indices
from data_prep.storage import open_binary, storage_error
from ncsn._checks import first_line
from ncsn.atomic import atomic_write
from ncsn.data import from_stored
from ncsn.metrics import (Estimate, Scaler, Spread, bootstrap_spread, fid_statistics, frechet_distance,
                          frechet_distance_from_statistics, inception_score, inception_score_splits, kid, kid_in_blocks, kid_subsets)
from pipelines.config import default_cache_dir

log = logging.getLogger(__name__)
CLASSIFIER = "ncsn-classifier"
CLASSIFIER_FORMAT = 2  # raised whenever the classifier changes: a cached one of another format is retrained
BOOTSTRAP_ROWS = 2000  # up to this many rows per set, every number uses all rows (the bootstrap and KID's kernels: O(rows²))
SCALER_ROWS = 2000  # training images whose features fix KID's scaler (a seeded draw; all of them when fewer)
KID_FEATURES = "standardised by the training split's per-feature mean and sd"
PROJECT, PUBLISHED = "project", "published"
PUBLISHED_SEED = 2020  # torch-fidelity's rng_seed: the published convention's IS split order and KID subsets
CLASSIFIER_FEATURES = 128  # the classifier's feature layer (FID, KID)
INCEPTION_FEATURES = 2048  # Inception-v3's pool3 (FID, KID)
STATS_METADATA = {"extractor", "extractor_id", "num_images", "reference"}  # what --save-stats adds to mu and sigma


class EvaluationError(ValueError):
    """Bad evaluation input (samples, reference shards, weights file), with a message that names it."""


@dataclass(frozen=True)
class Convention:
    """How the numbers are computed: ``project`` (KID on standardised features with a 95% interval, FID and one-split IS
    with bootstrap sds) or ``published`` (FID; IS over ``is_splits`` splits; KID on raw features over ``kid_subsets``
    subsets of ``kid_subset_size`` rows; the mean ± sd over splits and subsets, as torch-fidelity computes them)."""

    name: str = PROJECT
    is_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000

    def __post_init__(self):
        if self.name not in (PROJECT, PUBLISHED):
            raise EvaluationError(f"convention must be {PROJECT} or {PUBLISHED}, got {self.name!r}")
        for key, low in (("is_splits", 1), ("kid_subsets", 1), ("kid_subset_size", 3)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise EvaluationError(f"{key} must be an integer >= {low}, got {value!r}")

    @property
    def published(self) -> bool:
        return self.name == PUBLISHED

    def check_counts(self, num_samples: int | None, num_reference: int | None, what: str = "samples") -> None:
        """An EvaluationError (one line) when the published convention's splits or subsets do not fit these counts (None:
        not checked)."""
        if not self.published:
            return
        if num_samples is not None and num_samples < max(self.is_splits, self.kid_subset_size):
            raise EvaluationError(f"{num_samples} {what}: the published convention needs at least {self.kid_subset_size} "
                                  f"(KID's subset size; --kid-subset-size / evaluation.kid_subset_size) and {self.is_splits} "
                                  "(IS's splits)")
        if num_reference is not None and num_reference < self.kid_subset_size:
            raise EvaluationError(f"the reference has {num_reference} images, fewer than KID's subset size "
                                  f"{self.kid_subset_size} (--kid-subset-size / evaluation.kid_subset_size)")


@dataclass(frozen=True)
class Evaluation:
    """One set of images scored against a reference, and the card of what its numbers depend on."""

    extractor: str  # classifier | inception
    extractor_id: str  # digest of the extractor's weights
    reference_split: str  # train | validation | test | train+validation, or stats (a statistics file)
    num_samples: int
    num_reference: int | None  # None: a statistics file that does not say
    kid: Estimate | Spread | None  # project: a 95% interval; published: mean ± sd over subsets; None: see kid_note
    fid: Spread | float  # project: ± bootstrap sd; published: the value
    inception_score: Spread  # project: one split ± bootstrap sd; published: mean ± sd over splits
    convention: str = PROJECT
    reference: str = ""  # the shard set (location, manifest digest) or the statistics file (path, sha256)
    is_splits: int = 1
    kid_features: str = KID_FEATURES  # or raw
    kid_subsets: str = "all rows"  # all rows (one U-statistic) | K × N rows
    kid_note: str = ""  # why kid is None

    def card(self) -> dict[str, str | int | None]:
        """What these numbers depend on: two reports compare only where their cards agree."""
        return {"convention": self.convention, "extractor": self.extractor, "extractor_id": self.extractor_id,
                "reference": self.reference, "reference_split": self.reference_split, "num_reference": self.num_reference,
                "num_samples": self.num_samples, "is_splits": self.is_splits, "kid_features": self.kid_features,
                "kid_subsets": self.kid_subsets}

    def flat(self, prefix: str = "") -> dict[str, float]:
        """Every number, keys prefixed. project: kid_std_<extractor> with _low/_high (its 95% interval), fid_<extractor>
        and is_1split_<extractor> with _sd; published: kid_<extractor>, fid_<extractor>, is_<extractor>, KID and IS with
        _sd over subsets and splits. Then num_samples and num_reference."""
        out: dict[str, float] = {}
        kid_key = f"{prefix}kid_std_{self.extractor}" if self.convention == PROJECT else f"{prefix}kid_{self.extractor}"
        if isinstance(self.kid, Estimate):
            out.update({kid_key: self.kid.value, f"{kid_key}_low": self.kid.low, f"{kid_key}_high": self.kid.high})
        elif isinstance(self.kid, Spread):
            out.update({kid_key: self.kid.value, f"{kid_key}_sd": self.kid.sd})
        fid_key = f"{prefix}fid_{self.extractor}"
        out.update({fid_key: self.fid.value, f"{fid_key}_sd": self.fid.sd} if isinstance(self.fid, Spread) else {fid_key: self.fid})
        is_key = f"{prefix}is_1split_{self.extractor}" if self.convention == PROJECT else f"{prefix}is_{self.extractor}"
        out.update({is_key: self.inception_score.value, f"{is_key}_sd": self.inception_score.sd, f"{prefix}num_samples": self.num_samples})
        return out if self.num_reference is None else {**out, f"{prefix}num_reference": self.num_reference}

    @classmethod
    def from_record(cls, record: dict) -> Evaluation:
        def parse(v):
            return (Estimate(**v) if "low" in v else Spread(**v)) if isinstance(v, dict) else v
        return cls(**{k: parse(v) for k, v in record.items()})


CARD_LABELS = {PROJECT: ("kid_std", "fid", "is_1split"), PUBLISHED: ("kid", "fid", "is")}
CARD_NOTES = {PROJECT: "kid_std: KID on standardised features, value [95% interval]; fid, is_1split: value ±sd over bootstrap "
                       "resamples at these counts (IS over all samples at once)",
              PUBLISHED: "kid: KID on raw features, mean ±sd over subsets; fid: FID; is: Inception Score, mean ±sd over splits"}


@dataclass(frozen=True)
class Report:
    """A model's evaluation, the baselines at its count ({name: Evaluation}) and the extractor's own record."""

    model: Evaluation
    baselines: dict[str, Evaluation] = field(default_factory=dict)
    extractor: dict[str, float] = field(default_factory=dict)  # classifier accuracies, dead features

    def flat(self) -> dict[str, float]:
        """Every number as one flat {name: float} for MLflow, Tune and summary.json."""
        out = {**self.model.flat(), **self.extractor}
        for name, evaluation in self.baselines.items():
            out.update(evaluation.flat(f"{name}_"))
        return out

    def card(self) -> dict[str, str | int | None]:
        return self.model.card()

    def tags(self) -> dict[str, str]:
        """The card as MLflow tags (card.<field>)."""
        return {f"card.{k}": str(v) for k, v in self.card().items()}

    def record(self) -> dict:
        """JSON: the card, each evaluation (with its own card fields), the extractor's record."""
        return {"card": self.card(), "model": asdict(self.model), "baselines": {k: asdict(v) for k, v in self.baselines.items()},
                "extractor": self.extractor}

    def table(self) -> str:
        """The card, then metrics (rows) by model and baselines (columns) with each column's counts."""
        columns = {"model": self.model, **self.baselines}
        cells = {name: [str(e.kid) if e.kid is not None else f"n/a ({e.kid_note})", str(e.fid if isinstance(e.fid, Spread) else f"{e.fid:.4g}"),
                        str(e.inception_score)] for name, e in columns.items()}
        heads = {name: f"{name} ({e.num_samples} vs {e.num_reference if e.num_reference is not None else '?'} {e.reference_split})"
                 for name, e in columns.items()}
        widths = {name: max(len(heads[name]), *(len(c) for c in cells[name])) for name in columns}
        rows = card_lines(self.card()) + [f"  {'':<9}" + "".join(f"  {heads[n]:<{widths[n]}}" for n in columns)]
        for i, metric in enumerate(CARD_LABELS[self.model.convention]):
            rows.append(f"  {metric:<9}" + "".join(f"  {cells[n][i]:<{widths[n]}}" for n in columns))
        rows.append(f"  ({CARD_NOTES[self.model.convention]})")
        return "\n".join(rows)


def card_lines(card: dict) -> list[str]:
    """A card as the lines a report opens with."""
    return [f"  card: {card['convention']} convention; {card['extractor']} features (weights {card['extractor_id']}); "
            f"{card['num_samples']} samples vs {card['reference']}",
            f"        IS over {card['is_splits']} split(s); KID over {card['kid_subsets']}, on features {card['kid_features']}"]


def compare_cards(cards: dict[str, dict]) -> list[str]:
    """The card fields on which reports ({name: card}) differ, one line each: what makes their numbers incomparable."""
    names = list(cards)
    keys = [k for k in cards[names[0]] if len({json.dumps(c.get(k)) for c in cards.values()}) > 1]
    return [f"{k}: " + " vs ".join(f"{cards[n].get(k)} ({n})" for n in names) for k in keys]


class UInt8Images(Dataset):
    """uint8 (N, H, W, C) images as torch-fidelity wants them: uint8 (3, H, W), grey repeated to RGB."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)  # a copy: arrays from Ray are read-only
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def read_split(shards: Manifest | str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images (uint8 NHWC) and labels of one split of a shard set (its manifest, or its location), in shard order
    (batches of one: none left over)."""
    images, labels = [], []
    for x, y in make_loader(shards, 1, split=split, num_workers=0, shuffle_buffer=0):
        images.append(x.permute(0, 2, 3, 1).numpy())
        labels.append(y.numpy())
    if not images:
        raise EvaluationError(f"{getattr(shards, 'location', shards)}: split {split!r} has no images")
    return np.concatenate(images), np.concatenate(labels)


def read_first(shards: Manifest | str, split: str, count: int) -> np.ndarray:
    """The first ``count`` images (uint8 NHWC) of a split, in shard order, read from the leading shards that hold them
    alone; each of those is read to its end and hashed against the manifest, as every read is."""
    if count < 1:
        raise EvaluationError(f"the number of images must be >= 1, got {count}")
    manifest = load_manifest(shards) if isinstance(shards, str) else shards
    leading, held = [], 0
    for shard in manifest.split(split).shards:
        if held >= count:
            break
        leading.append(shard)
        held += shard.count
    if held < count:
        raise EvaluationError(f"{manifest.location}: split {split!r} holds {held} images, fewer than the {count} asked for")
    part = replace(manifest, splits={**manifest.splits, split: replace(manifest.split(split), count=held, shards=tuple(leading))})
    (images, _), = list(make_loader(part, count, split=split, shuffle_buffer=0, batches_per_epoch=1))
    return images.permute(0, 2, 3, 1).numpy()


def load_image_folder(path: str | Path, channels: int, size: int) -> np.ndarray:
    """Every PNG/JPEG under ``path`` (sorted by relative path) as uint8 (N, size, size, channels), converted as the shard
    job converts an image folder (8-bit modes only; to grey or RGB); images of another model, scored against our
    reference. Sizes are checked from the file headers before anything is decoded."""
    if Path(path).is_dir() and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in Path(path).rglob("*")):
        raise EvaluationError(f"{path} holds neither sample chunks (chunks/chunk_*.npz from `ncsn-pipeline sample`) "
                              "nor .png/.jpg/.jpeg images")
    try:
        source = ImageFolderSource(path, channels=channels, test_fraction=0, validation_fraction=0)
        source.check_size(size)
        images = [r.image for r in source.read("train", 0, source.count("train"))]
    except SourceError as err:
        raise EvaluationError(str(err)) from None
    return np.stack(images)


class Classifier(nn.Module):
    """A small CNN for 8–64 px images: three conv blocks with batch norm, a 128-d linear feature layer, class logits.
    The features are taken before the head's ReLU, so none is constant (dead) on the data."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        def block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.body = nn.Sequential(*block(channels, width), *block(width, width), *block(width, 2 * width, 2),
                                  *block(2 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16 * width, CLASSIFIER_FEATURES))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(CLASSIFIER_FEATURES, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(features)


def _shifted(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The batch translated by up to 1/8 of its size (edge pixels repeated): the classifier's only augmentation."""
    pad = max(1, x.shape[-1] // 8)
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return nn.functional.pad(x, (pad,) * 4, mode="replicate")[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def _accuracy(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((torch.cat([model(b)[1].argmax(1) for b in x.split(1024)]) == y).float().mean())


def train_classifier(shards: Manifest | str, out: Path, seed: int = 0, batch_size: int = 64, max_epochs: int = 100, patience: int = 10,
                     progress: bool = True) -> dict:
    """Train the feature classifier deterministically (seeded) to convergence: a stratified 10% of the training split
    validates, the epoch of lowest validation loss is kept (at most ``max_epochs``, stopping ``patience`` epochs after
    the best). Saved with its validation and test accuracy; returns that record."""
    manifest = load_manifest(shards) if isinstance(shards, str) else shards
    x_train, y_train = read_split(manifest, "train")
    if (y_train < 0).any():
        raise EvaluationError(f"{manifest.location}: the classifier feature extractor needs labelled training images and this shard set "
                              "has none; use --feature-extractor inception (with --inception-weights PATH on a machine "
                              "without internet)")
    x_test, y_test = read_split(manifest, "test")
    num_classes = len(manifest.classes or ()) or int(y_train.max()) + 1
    held = stratified_indices(y_train, max(num_classes, len(y_train) // 10), seed)
    fit = np.setdiff1d(np.arange(len(y_train)), held)
    xf, yf = from_stored(x_train[fit]), torch.from_numpy(y_train[fit]).long()
    xv, yv = from_stored(x_train[held]), torch.from_numpy(y_train[held]).long()
    log.info("training the feature classifier on %d images of %s (validated on %d; once per shard set, cached in %s)",
             len(fit), manifest.location, len(held), out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same seed gives the same weights whatever the worker's CPU count
    try:
        model, epochs = _fit_classifier(xf, yf, xv, yv, num_classes, seed, batch_size, max_epochs, patience, progress)
    finally:
        torch.set_num_threads(threads)
    record = {"state_dict": model.state_dict(), "channels": x_train.shape[-1], "num_classes": num_classes, "image_size": x_train.shape[1],
              "test_accuracy": _accuracy(model, from_stored(x_test), torch.from_numpy(y_test).long()),
              "validation_accuracy": _accuracy(model, xv, yv), "epochs": epochs, "seed": seed, "format": CLASSIFIER_FORMAT}
    atomic_write(out, lambda tmp: torch.save(record, tmp))
    log.info("classifier for %s: validation accuracy %.3f, test accuracy %.3f after %d epochs (%s)", manifest.location,
             record["validation_accuracy"], record["test_accuracy"], record["epochs"], out)
    return record


def _fit_classifier(xf: torch.Tensor, yf: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, num_classes: int, seed: int,
                    batch_size: int, max_epochs: int, patience: int, progress: bool) -> tuple[Classifier, int]:
    """The training loop of train_classifier: the model at its best epoch (in eval mode) and that epoch's number."""
    torch.manual_seed(seed)
    model = Classifier(xf.shape[1], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    best_loss, best_state, best_epoch = float("inf"), None, 0
    for epoch in tqdm(range(max_epochs), desc="feature classifier", unit="epoch", disable=None if progress else True):  # on a terminal
        model.train()
        for idx in torch.randperm(len(xf), generator=gen).split(batch_size):
            loss = nn.functional.cross_entropy(model(_shifted(xf[idx], gen))[1], yf[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(torch.cat([nn.functional.cross_entropy(model(b)[1], t, reduction="none")
                                        for b, t in zip(xv.split(1024), yv.split(1024))]).mean())
        if val_loss < best_loss:
            best_loss, best_state, best_epoch = val_loss, copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    return model.eval(), best_epoch + 1


def _load_classifier(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _cached_classifier(path: str) -> dict | None:
    """The classifier record cached at ``path`` if it is one of this version (tensors only); else None, to retrain."""
    if not Path(path).exists():
        return None
    try:
        record = _load_classifier(path)
    except Exception as err:  # noqa: BLE001 — not tensors (a pickle is refused here), truncated, …
        log.warning("ignoring unreadable classifier cache %s (%s); retraining", path, type(err).__name__)
        return None
    if not isinstance(record, dict) or record.get("format") != CLASSIFIER_FORMAT:
        log.warning("classifier cache %s is from another version; retraining", path)
        return None
    return record


def _make_extractor_class():
    class ClassifierFeatures(FeatureExtractorBase):
        """torch-fidelity feature extractor over our classifier: "features" (128-d) for FID/KID, "logits" for IS."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise EvaluationError("the classifier feature extractor needs its weights file")
            record = _load_classifier(feature_extractor_weights_path)
            self.channels, self.size = record["channels"], record["image_size"]
            self.net = Classifier(record["channels"], record["num_classes"])
            self.net.load_state_dict(record["state_dict"])
            self.eval().requires_grad_(False)

        def forward(self, x: torch.Tensor):
            x = x.float() / 255
            if self.channels == 1:
                x = x.mean(1, keepdim=True)
            if x.shape[-1] != self.size:
                x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            features, logits = self.net(x)
            found = {"features": features, "logits": logits}
            return tuple(found[f] for f in self.features_list)

        @staticmethod
        def get_provided_features_list():
            return "features", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

    return ClassifierFeatures


def register_classifier_extractor() -> None:
    if CLASSIFIER not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(CLASSIFIER, _make_extractor_class())


def check_inception_weights(path: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` if it is plain tensors (weights_only=True); anything else is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EvaluationError(f"--inception-weights {path}: no such file") from None
    except Exception as err:  # noqa: BLE001 — unpickling refused or not a torch file
        raise EvaluationError(f"--inception-weights {path}: not a plain PyTorch state dict that loads with weights_only=True "
                              f"({type(err).__name__}: {first_line(err, 200)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvaluationError(f"--inception-weights {path}: expected a state dict of tensors (torch-fidelity's pt_inception-2015-12-05 file)")
    return state


def _private_weights(state: dict[str, torch.Tensor], directory: str) -> str:
    """``state`` written by this process into its own 0700 directory: torch-fidelity unpickles the weights file it is
    given with weights_only=False, so it only ever gets bytes verified as tensors and written here."""
    path = Path(directory) / "inception.pt"
    torch.save(state, path)
    return str(path)


def _download_inception_weights() -> dict[str, torch.Tensor]:
    """torch-fidelity's Inception weights from its URL, read as tensors only (the hub cache is user-writable)."""

    try:
        return torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, map_location="cpu", progress=False, weights_only=True)
    except Exception as err:  # noqa: BLE001 — no network, or a cached file that is not plain tensors
        raise EvaluationError(f"cannot load the Inception weights from {URL_INCEPTION_V3} ({type(err).__name__}: "
                              f"{first_line(err, 200)}); on a machine without internet pass --inception-weights PATH") from None


def _tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """A short SHA-256 of a state dict's names and tensor bytes: equal weights, equal digest."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ReferenceStats:
    """Published FID reference statistics (μ, Σ of a reference's features), from a .npz file, and what identifies them."""

    mu: np.ndarray
    sigma: np.ndarray
    source: str  # the file as given
    sha256: str
    extractor: str | None = None  # written by --save-stats: the extractor and its weights' digest, the image count
    extractor_id: str | None = None
    num_images: int | None = None

    def describe(self) -> str:
        return f"statistics file {self.source} (sha256 {self.sha256})"


def load_reference_stats(path: str) -> ReferenceStats:
    """FID statistics from a .npz (a path or URL): ``mu`` (d,) and ``sigma`` (d, d) as pytorch-fid, TTUR and EDM write
    them, plus what --save-stats adds; read without unpickling, anything else refused with one line."""
    what = f"--reference-stats {path}"
    try:
        with open_binary(path) as f:
            data = f.read()
    except FileNotFoundError:
        raise EvaluationError(f"{what}: no such file") from None
    except OSError as err:
        raise EvaluationError(f"{what}: {first_line(storage_error(path, err), 200)}") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as err:  # noqa: BLE001 — not a zip of .npy arrays, or object arrays (pickles) refused
        raise EvaluationError(f"{what}: not a NumPy .npz of plain arrays ({type(err).__name__}: {first_line(err, 160)})") from None
    extra = set(arrays) - {"mu", "sigma"} - STATS_METADATA
    if not {"mu", "sigma"} <= set(arrays) or extra:
        raise EvaluationError(f"{what}: expected the arrays mu and sigma (FID statistics), found {sorted(arrays)}")
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.dtype.kind != "f" or sigma.dtype.kind != "f" or mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise EvaluationError(f"{what}: mu must be (d,) and sigma (d, d) floats, got {mu.shape} {mu.dtype} and {sigma.shape} {sigma.dtype}")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvaluationError(f"{what}: mu or sigma holds NaN or infinite values")
    if not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8 * max(1.0, float(np.abs(sigma).max()))):
        raise EvaluationError(f"{what}: sigma is not symmetric, so it is not a covariance matrix")
    meta = {k: arrays[k].item() for k in STATS_METADATA & set(arrays)}
    return ReferenceStats(mu, sigma, path, hashlib.sha256(data).hexdigest(), meta.get("extractor"), meta.get("extractor_id"),
                          int(meta["num_images"]) if "num_images" in meta else None)


def check_reference_stats(stats: ReferenceStats, extractor: str, extractor_id: str | None = None) -> None:
    """An EvaluationError (one line) when ``stats`` were not made with this extractor: another dimension, another
    extractor or weights digest, or (for the classifier, which is trained per shard set) no record of which."""
    dim = CLASSIFIER_FEATURES if extractor == "classifier" else INCEPTION_FEATURES
    what = f"--reference-stats {stats.source}"
    if len(stats.mu) != dim:
        raise EvaluationError(f"{what}: {len(stats.mu)}-d statistics, but the {extractor} extractor's features are {dim}-d")
    if stats.extractor is not None and stats.extractor != extractor:
        raise EvaluationError(f"{what}: made with the {stats.extractor} extractor, this evaluation uses {extractor}")
    if extractor == "classifier" and stats.extractor_id is None:
        raise EvaluationError(f"{what}: says nothing of the classifier that made it (each shard set trains its own); "
                              "write it with `evaluate --save-stats` or use --feature-extractor inception")
    if extractor_id is not None and stats.extractor_id is not None and stats.extractor_id != extractor_id:
        raise EvaluationError(f"{what}: made with {extractor} weights {stats.extractor_id}, this evaluation's are {extractor_id}")


class Evaluator:
    """KID/FID/IS of uint8 sample arrays against one split of a shard set (or reference statistics), with one feature
    extractor, in one convention.

    Features come from torch-fidelity's extractor, metrics and intervals from ``ncsn.metrics``; torch-fidelity's own
    cache is never used (it unpickles with weights_only=False). Reference features and KID's scaler are cached as
    tensors-only files read with weights_only=True, keyed by the extractor's weights digest; an unreadable or mismatched
    cache file is recomputed, never trusted."""

    def __init__(self, shards: str, extractor: str = "classifier", inception_weights: str | dict[str, torch.Tensor] | None = None,
                 reference_split: str = "test", cache_dir: Path | None = None, resamples: int = 200, use_gpu: bool = False,
                 progress: bool = True, convention: Convention = Convention(), reference_stats: ReferenceStats | None = None):
        if extractor not in ("classifier", "inception"):
            raise EvaluationError(f"feature extractor must be classifier or inception, got {extractor!r}")
        if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 10:
            raise EvaluationError(f"bootstrap resamples must be an integer >= 10, got {resamples!r}")
        if reference_stats is not None and not convention.published:
            raise EvaluationError("--reference-stats needs the published convention (the project convention's KID "
                                  "interval and bootstrap sds need the reference's features, not only their statistics)")
        self.shards, self.extractor, self.split = shards, extractor, reference_split
        self.resamples, self.cuda = resamples, use_gpu and torch.cuda.is_available()
        self.convention, self.stats = convention, reference_stats
        self.progress = progress and sys.stderr.isatty()  # the feature-extraction bars, on a terminal only
        self.manifest = load_manifest(shards)
        count = split_count(self.manifest, reference_split)
        if reference_stats is not None:
            check_reference_stats(reference_stats, extractor)
        else:
            convention.check_counts(None, count)
        self.cache = (cache_dir or default_cache_dir()) / self.manifest.digest
        self._splits: dict[str, np.ndarray] = {}  # images of each split, decoded once
        self.info: dict[str, float] = {}
        self._extractor, self._scaler = None, None
        if extractor == "classifier":
            register_classifier_extractor()
            self.weights = str(self.cache / "classifier.pt")
            record = _cached_classifier(self.weights) or train_classifier(self.manifest, Path(self.weights), progress=progress)
            self.info = {"classifier_test_accuracy": float(record["test_accuracy"]),
                         "classifier_validation_accuracy": float(record["validation_accuracy"])}
            self.fidelity_name, state = CLASSIFIER, record["state_dict"]
        else:
            state = (check_inception_weights(inception_weights) if isinstance(inception_weights, str)
                     else inception_weights or _download_inception_weights())
            self._private = tempfile.TemporaryDirectory(prefix="ncsn-inception-")  # removed with this object
            self.weights, self.fidelity_name = _private_weights(state, self._private.name), "inception-v3-compat"
            try:  # torch-fidelity loads the weights as it builds the extractor: build it now, before any work
                self._extractor = self._build_extractor()
            except RuntimeError as err:
                origin = inception_weights if isinstance(inception_weights, str) else "(as given)"
                raise EvaluationError(f"--inception-weights {origin}: these tensors are not torch-fidelity's Inception v3 "
                                      f"({first_line(err, 160)})") from None
        self.extractor_id = _tensors_digest(state)  # the weights' content: a rebuild from the same seed has the same id
        if reference_stats is not None:
            check_reference_stats(reference_stats, extractor, self.extractor_id)

    @property
    def reference(self) -> np.ndarray:
        """The reference split's uint8 NHWC images."""
        return self.split_images(self.split)

    def split_images(self, split: str) -> np.ndarray:
        """The uint8 NHWC images of one split of the shard set (or of train+validation, in that order), decoded on first use."""
        if split not in self._splits:
            parts = split.split("+")
            self._splits[split] = (read_split(self.manifest, split)[0] if len(parts) == 1
                                   else np.concatenate([self.split_images(part) for part in parts]))
        return self._splits[split]

    def _layers(self) -> dict[str, str]:
        cls = FEATURE_EXTRACTORS_REGISTRY[self.fidelity_name]
        return {metric: cls.get_default_feature_layer_for_metric(metric) for metric in ("fid", "isc", "kid")}

    def _build_extractor(self) -> FeatureExtractorBase:
        return create_feature_extractor(self.fidelity_name, sorted(set(self._layers().values())), cuda=self.cuda,
                                        feature_extractor_weights_path=self.weights, verbose=False)

    def features(self, images: np.ndarray, what: str = "images") -> dict[str, np.ndarray]:
        """{layer: (N, d) float64 features} of uint8 NHWC images from the extractor (built once), 64 at a time, under a
        progress bar naming ``what`` they are."""

        if self._extractor is None:
            self._extractor = self._build_extractor()
        found: dict[str, list[torch.Tensor]] = {}
        batches = DataLoader(UInt8Images(images), batch_size=64, pin_memory=self.cuda)
        with torch.no_grad(), tqdm(total=len(images), desc=f"{self.extractor} features of {what}", unit="img",
                                   disable=not self.progress, leave=False) as bar:
            for batch in batches:
                layers = self._extractor.convert_features_tuple_to_dict(self._extractor(batch.cuda() if self.cuda else batch))
                for layer, value in layers.items():
                    found.setdefault(layer, []).append(value.cpu())
                bar.update(len(batch))
        return {k: torch.cat(v).double().numpy() for k, v in found.items()}

    def _cached(self, name: str, compute, valid) -> dict[str, np.ndarray]:
        """``compute()``'s {name: 2-d array} from the tensors-only cache file ``name`` when ``valid`` accepts what it holds;
        otherwise computed and cached."""
        path = self.cache / f"{name}-{self.extractor}-{self.extractor_id}.pt"
        if path.exists():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(cached, dict) and all(isinstance(v, torch.Tensor) for v in cached.values()) and valid(cached):
                    return {k: v.numpy() for k, v in cached.items()}
                log.warning("cache %s does not hold what this evaluation needs; recomputing", path)
            except Exception as err:  # noqa: BLE001 — not tensors (a pickle is refused here), truncated, …
                log.warning("ignoring unreadable cache %s (%s); recomputing", path, type(err).__name__)
        out = compute()
        atomic_write(path, lambda tmp: torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}, tmp))
        return out

    def reference_features(self) -> dict[str, np.ndarray]:
        """The reference split's features, from the cache when it holds exactly those (tensors only), else computed."""
        layers, count = set(self._layers().values()), split_count(self.manifest, self.split)
        return self._cached(f"features-{self.split}", lambda: self.features(self.reference, f"the {self.split} split"),
                            lambda c: set(c) == layers and all(v.dim() == 2 and len(v) == count for v in c.values()))

    def reference_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """μ and Σ of the reference's FID features: the statistics file's, else the reference split's."""
        if self.stats is not None:
            return self.stats.mu, self.stats.sigma
        return fid_statistics(self.reference_features()[self._layers()["fid"]])

    def save_stats(self, path: Path) -> None:
        """The reference split's FID statistics as a .npz (mu, sigma, as pytorch-fid, TTUR and EDM read them), with the
        extractor, its weights' digest, the image count and the reference (which `--reference-stats` checks)."""
        mu, sigma = self.reference_statistics()
        meta = {"extractor": self.extractor, "extractor_id": self.extractor_id, "num_images": split_count(self.manifest, self.split),
                "reference": self.describe_reference()}
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez adds no .npz suffix
                np.savez(f, mu=mu, sigma=sigma, **{k: np.array(v) for k, v in meta.items()})
        atomic_write(path, write)

    def describe_reference(self) -> str:
        if self.stats is not None:
            return self.stats.describe()
        return f"the {self.split} split of {self.manifest.location} (manifest {self.manifest.digest})"

    def scaler(self) -> Scaler:
        """KID's fixed feature scaler: the per-feature mean and sd of up to SCALER_ROWS training images (seed 0), once per
        extractor and shard set."""
        if self._scaler is None:
            def compute() -> dict[str, np.ndarray]:
                train = self.split_images("train")
                rows = np.sort(np.random.default_rng(0).permutation(len(train))[:SCALER_ROWS])
                fitted = Scaler.fit(self.features(train[rows], "the training split (KID's scaler)")[self._layers()["kid"]])
                return {"mean": fitted.mean, "sd": fitted.sd}
            found = self._cached("kid-scaler", compute, lambda c: set(c) == {"mean", "sd"} and c["mean"].shape == c["sd"].shape)
            self._scaler = Scaler(found["mean"], found["sd"])
        return self._scaler

    def _check(self, images: np.ndarray, what: str) -> None:
        shape = tuple(self.manifest.image_shape)
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1:] != shape:
            raise EvaluationError(f"{what} of shape {images.shape} ({images.dtype}) do not match the reference images "
                                  f"{shape} (uint8)")
        if len(images) < 3:
            raise EvaluationError(f"{what}: {len(images)} image(s); KID's interval needs at least 3")

    def _card(self) -> dict:
        """The Evaluation fields every score of this evaluator shares (its card, less the counts)."""
        c = self.convention
        return {"extractor": self.extractor, "extractor_id": self.extractor_id, "convention": c.name,
                "reference_split": "stats" if self.stats is not None else self.split, "reference": self.describe_reference(),
                "is_splits": c.is_splits if c.published else 1, "kid_features": "raw (as extracted)" if c.published else KID_FEATURES,
                "kid_subsets": f"{c.kid_subsets} subsets of {c.kid_subset_size} rows (seed {PUBLISHED_SEED})" if c.published
                else "all rows (one U-statistic)"}

    def compare(self, ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], seed: int = 0, reference_split: str | None = None) -> Evaluation:
        """Project convention: KID (standardised features, 95% interval), FID and IS (bootstrap sd) of feature sets
        ``ours`` against ``ref``. Sets over BOOTSTRAP_ROWS rows: the values come from all rows (KID as the mean of the
        unbiased statistic over blocks of that size), KID's interval width and the sds from a random BOOTSTRAP_ROWS-row
        subset of each (wider than all rows would give: conservative)."""
        layers, split = self._layers(), reference_split or self.split
        n, m = len(ours[layers["fid"]]), len(ref[layers["fid"]])
        if max(n, m) <= BOOTSTRAP_ROWS:
            return self._compare_all(ours, ref, seed, split)
        rng = np.random.default_rng(seed)
        ix, iy = (np.sort(rng.choice(k, size=min(k, BOOTSTRAP_ROWS), replace=False)) for k in (n, m))
        small = self._compare_all({k: v[ix] for k, v in ours.items()}, {k: v[iy] for k, v in ref.items()}, seed, split)
        scale = self.scaler()
        value = kid_in_blocks(scale(ours[layers["kid"]]), scale(ref[layers["kid"]]), BOOTSTRAP_ROWS, seed)
        return Evaluation(**{**self._card(), "reference_split": split}, num_samples=n, num_reference=m,
                          kid=Estimate(value, value - (small.kid.value - small.kid.low), value + (small.kid.high - small.kid.value)),
                          fid=Spread(frechet_distance(ours[layers["fid"]], ref[layers["fid"]]), small.fid.sd),
                          inception_score=Spread(inception_score(ours[layers["isc"]]), small.inception_score.sd))

    def _compare_all(self, ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], seed: int, split: str) -> Evaluation:
        layers, scale = self._layers(), self.scaler()
        x, y, logits = ours[layers["fid"]], ref[layers["fid"]], ours[layers["isc"]]
        n, m = len(x), len(y)
        fid = bootstrap_spread(lambda ix, iy: frechet_distance(x[ix], y[iy]), n, m, self.resamples, seed)
        score = bootstrap_spread(lambda ix, _: inception_score(logits[ix]), n, m, self.resamples, seed)
        return Evaluation(**{**self._card(), "reference_split": split}, num_samples=n, num_reference=m,
                          kid=kid(scale(ours[layers["kid"]]), scale(ref[layers["kid"]])), fid=fid, inception_score=score)

    def published(self, ours: dict[str, np.ndarray]) -> Evaluation:
        """Published convention: FID against the reference's statistics, IS over splits, KID over subsets of raw
        features (none against a statistics file, or for a set smaller than a subset: kid_note says which)."""
        layers, c = self._layers(), self.convention
        x = ours[layers["fid"]]
        fid = frechet_distance_from_statistics(*fid_statistics(x), *self.reference_statistics())
        score = inception_score_splits(ours[layers["isc"]], c.is_splits, PUBLISHED_SEED)
        if self.stats is not None:
            kid_value, note, m = None, "a statistics file holds no features", self.stats.num_images
        else:
            ref = self.reference_features()[layers["kid"]]
            m = len(ref)
            small = min(len(x), m) < c.kid_subset_size
            kid_value = None if small else kid_subsets(ours[layers["kid"]], ref, c.kid_subsets, c.kid_subset_size, PUBLISHED_SEED)
            note = f"{min(len(x), m)} rows < subsets of {c.kid_subset_size}" if small else ""
        return Evaluation(**self._card(), num_samples=len(x), num_reference=m, kid=kid_value, fid=fid, inception_score=score,
                          kid_note=note)

    def evaluate(self, samples: np.ndarray, seed: int = 0, what: str = "the samples") -> Evaluation:
        """The metrics of ``samples`` (uint8 NHWC) against the reference, in this evaluator's convention (``seed``: the
        project convention's bootstrap; ``what``: their name on the progress bar)."""
        self._check(samples, "samples")
        if self.convention.published:
            if len(samples) < self.convention.is_splits:
                raise EvaluationError(f"{len(samples)} images, fewer than the {self.convention.is_splits} IS splits")
            return self.published(self.features(samples, what))
        return self.compare(self.features(samples, what), self.reference_features(), seed)

    def metrics(self, samples: np.ndarray, seed: int = 0) -> dict[str, float]:
        """evaluate() flattened (Evaluation.flat)."""
        return self.evaluate(samples, seed).flat()

    def heldout_split(self) -> str:
        """The split of real images that the baselines compare with the reference: held out from training and from the
        classifier (validation; test when the reference holds the validation split)."""
        return "test" if "validation" in self.split.split("+") else "validation"

    def baselines(self, num_samples: int, seed: int = 0) -> dict[str, Evaluation]:
        """At up to ``num_samples``: real held-out images against the reference (heldout_real: what a model
        indistinguishable from the data scores at this count; neither the score network nor the classifier saw them;
        as many as the held-out split has) and a Gaussian fitted to the training split (gaussian: a weak model). Cached
        per extractor, convention, reference, count, seed and resample count."""
        held = self.heldout_split()
        split_count(self.manifest, held)
        c = self.convention
        protocol = (f"published{c.is_splits}-{c.kid_subsets}x{c.kid_subset_size}-{self.stats.sha256[:16] if self.stats else self.split}"
                    if c.published else f"{self.split}-{self.resamples}")
        path = self.cache / f"baselines-{protocol}-{self.extractor}-{self.extractor_id}-{num_samples}-{seed}.json"
        if path.exists():
            try:
                return {k: Evaluation.from_record(v) for k, v in json.loads(path.read_text()).items()}
            except (ValueError, TypeError, AttributeError, KeyError) as err:
                log.warning("ignoring unreadable baseline cache %s (%s); recomputing", path, type(err).__name__)
        log.info("baselines at %d samples against %s (cached in %s)", num_samples, self.describe_reference(), self.cache)
        real, train = self.split_images(held), self.split_images("train")
        rng = np.random.default_rng(seed)
        real = real[np.sort(rng.permutation(len(real))[:num_samples])]
        out = {"heldout_real": self.evaluate(real, seed, "held-out real images"),
               "gaussian": self.evaluate(fitted_gaussian_samples(train, num_samples, rng), seed, "the Gaussian baseline")}
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps({k: asdict(v) for k, v in out.items()})))
        return out

    def report(self, samples: np.ndarray, baseline_samples: int = 0, seed: int = 0) -> Report:
        """The samples' evaluation, with the baselines at ``baseline_samples`` (none when 0) and the extractor's record."""
        self.convention.check_counts(len(samples), None)  # before any features are extracted
        model = self.evaluate(samples, seed)
        spread = np.diag(self.stats.sigma) if self.stats is not None else self.reference_features()[self._layers()["fid"]].std(0)
        dead = int((spread == 0).sum())  # features constant on the reference
        return Report(model, self.baselines(baseline_samples, seed) if baseline_samples else {},
                      {**self.info, "extractor_dead_features": float(dead)})


def split_count(manifest: Manifest, split: str) -> int:
    """The number of images in a split of the shard set, or in train+validation (the data set's official training set);
    an EvaluationError (one line) when the shard set has no such split."""
    try:
        return sum(manifest.split(part).count for part in split.split("+"))
    except ShardError as err:
        raise EvaluationError(str(err)) from None


@dataclass(frozen=True)
class EvaluationRequest:
    """What one evaluation needs besides the samples, checked on the driver and shipped to the worker as it is."""

    shards: str
    extractor: str = "classifier"
    reference_split: str = "test"
    convention: Convention = Convention()
    reference_stats: ReferenceStats | None = None
    cache_dir: str | None = None
    resamples: int = 200
    use_gpu: bool = False


def _report(request: EvaluationRequest, samples: np.ndarray, inception_weights: dict[str, torch.Tensor] | None,
            baseline_samples: int, seed: int) -> Report:
    r = request
    evaluator = Evaluator(r.shards, r.extractor, inception_weights, r.reference_split, Path(r.cache_dir) if r.cache_dir else None,
                          r.resamples, r.use_gpu, progress=False, convention=r.convention, reference_stats=r.reference_stats)
    return evaluator.report(samples, baseline_samples, seed)


def evaluate_on_worker(request: EvaluationRequest, samples: np.ndarray, inception_weights: str | None = None,
                       baseline_samples: int = 0, seed: int = 0, num_cpus: float = 1) -> Report:
    """Evaluator.report in a Ray task with the given resources (a GPU when ``request.use_gpu``): the samples go there
    through Ray's object store, the reference is read from ``request.shards`` (a path or URL) there, and only the report
    comes back. Inception weights given as a file are verified here, on the driver."""

    state = check_inception_weights(inception_weights) if inception_weights else None
    task = ray.remote(num_cpus=num_cpus, num_gpus=1 if request.use_gpu else 0, max_retries=0)(_report)
    try:
        return ray.get(task.remote(request, ray.put(samples), state, baseline_samples, seed))
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, (EvaluationError, ValueError, OSError)):  # bad input or an unreadable location: one line
            raise err.cause from None
        raise


def fitted_gaussian_samples(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Samples of N(mean, covariance) of the images (full covariance through the data's SVD), as uint8."""
    x = images.reshape(len(images), -1).astype(np.float64)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    z = rng.standard_normal((n, len(s)))
    draws = mean + (z * s / np.sqrt(len(x) - 1)) @ vt
    return np.clip(np.rint(draws), 0, 255).astype(np.uint8).reshape((n,) + images.shape[1:])
