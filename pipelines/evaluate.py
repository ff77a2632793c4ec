"""FID, Inception Score and KID of a sample set against a shard split, with torch-fidelity.

Two feature extractors: torch-fidelity's Inception-v3 (downloaded, or a weights file given by path for air-gapped
clusters) and a small CNN classifier trained once on the labelled training shards ("classifier FID/IS", as LeNet
features are used for MNIST). Metric names say which one: fid_inception, fid_classifier, … Baselines per data set:
the training split against the test split (the floor) and a Gaussian fitted to the training split (a weak model)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from data_prep.loader import make_loader
from data_prep.shard import load_manifest, manifest_digest
from data_prep.storage import sha256_and_size
from ncsn.atomic import atomic_write
from ncsn.data import from_stored

log = logging.getLogger(__name__)
CLASSIFIER = "ncsn-classifier"
_FIDELITY_KEYS = {"frechet_inception_distance": "fid", "inception_score_mean": "is", "inception_score_std": "is_std",
                  "kernel_inception_distance_mean": "kid", "kernel_inception_distance_std": "kid_std"}


class EvaluationError(ValueError):
    """Bad evaluation input (samples, reference shards, weights file), with a message that names it."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("NCSN_CACHE", Path.home() / ".cache" / "ncsn-pipeline"))


class UInt8Images(Dataset):
    """uint8 (N, H, W, C) images as torch-fidelity wants them: uint8 (3, H, W), grey repeated to RGB."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)  # a copy: arrays from Ray are read-only
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def read_split(shards: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images (uint8 NHWC) and labels of one split of a shard set, in shard order."""
    images, labels = [], []
    for x, y in make_loader(shards, 256, split=split, num_workers=0, shuffle_buffer=0):
        images.append(x.permute(0, 2, 3, 1).numpy())
        labels.append(y.numpy())
    if not images:
        raise EvaluationError(f"{shards}: split {split!r} has no images")
    return np.concatenate(images), np.concatenate(labels)


class Classifier(nn.Module):
    """A small CNN for 8–64 px images: three conv blocks, a 128-d feature layer, class logits."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(16 * width, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(features)


def train_classifier(shards: str, out: Path, steps: int = 1500, batch_size: int = 64, seed: int = 0) -> dict:
    """Train the classifier on the labelled training split; save it with its test accuracy; return that record."""
    manifest = load_manifest(shards)
    x_train, y_train = read_split(shards, "train")
    x_test, y_test = read_split(shards, "test")
    num_classes = len(manifest.get("classes") or []) or int(y_train.max()) + 1
    if (y_train < 0).any():
        raise EvaluationError(f"{shards}: the classifier extractor needs labelled training images (some labels are missing)")
    channels = x_train.shape[-1]
    torch.manual_seed(seed)
    model = Classifier(channels, num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = from_stored(x_train), torch.from_numpy(y_train).long()
    gen = torch.Generator().manual_seed(seed)
    log.info("training the feature classifier on %d images of %s (%d steps, once per shard set; cached in %s)", len(xt), shards, steps, out)
    for _ in tqdm(range(steps), desc="feature classifier", unit="step", disable=None):  # a bar on a terminal only
        idx = torch.randint(len(xt), (batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(model(xt[idx])[1], yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(from_stored(x_test))[1].argmax(1).numpy() == y_test).mean().item()
    record = {"state_dict": model.state_dict(), "channels": channels, "num_classes": num_classes, "image_size": x_train.shape[1],
              "test_accuracy": accuracy}
    atomic_write(out, lambda tmp: torch.save(record, tmp))
    log.info("classifier for %s: test accuracy %.3f (%s)", shards, accuracy, out)
    return record


def _load_classifier(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _make_extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

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
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

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
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
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
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    try:
        return torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, map_location="cpu", progress=False, weights_only=True)
    except Exception as err:  # noqa: BLE001 — no network, or a cached file that is not plain tensors
        raise EvaluationError(f"cannot load the Inception weights from {URL_INCEPTION_V3} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]}); on a machine without internet pass --inception-weights PATH") from None


def _tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """A short SHA-256 of a state dict's names and tensor bytes: equal weights, equal digest."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class Evaluator:
    """FID/IS/KID of uint8 sample arrays against one split of a shard set, with one feature extractor.

    Features come from torch-fidelity's extractor and metrics from its functions; its own cache is never used (it
    unpickles with weights_only=False). The reference features are cached as a tensors-only file read with
    weights_only=True; an unreadable or mismatched cache file is recomputed, never trusted."""

    def __init__(self, shards: str, extractor: str = "classifier", inception_weights: str | dict[str, torch.Tensor] | None = None,
                 reference_split: str = "test", cache_dir: Path | None = None, kid_subset_size: int = 100, use_gpu: bool = False):
        if extractor not in ("classifier", "inception"):
            raise EvaluationError(f"feature extractor must be classifier or inception, got {extractor!r}")
        if isinstance(kid_subset_size, bool) or not isinstance(kid_subset_size, int) or kid_subset_size < 2:
            raise EvaluationError(f"kid_subset_size must be an integer >= 2, got {kid_subset_size!r}")
        self.shards, self.extractor, self.split = shards, extractor, reference_split
        self.kid_subset_size, self.cuda = kid_subset_size, use_gpu and torch.cuda.is_available()
        self.manifest = load_manifest(shards)
        self.cache = (cache_dir or default_cache_dir()) / manifest_digest(self.manifest)
        self.reference, _ = read_split(shards, reference_split)
        self.extra: dict = {}
        self._extractor = None
        if extractor == "classifier":
            register_classifier_extractor()
            self.weights = str(self.cache / "classifier.pt")
            if not Path(self.weights).exists():
                train_classifier(shards, Path(self.weights))
            self.extra["classifier_test_accuracy"] = float(_load_classifier(self.weights)["test_accuracy"])
            self.fidelity_name = CLASSIFIER
        else:
            state = (check_inception_weights(inception_weights) if isinstance(inception_weights, str)
                     else inception_weights or _download_inception_weights())
            self._private = tempfile.TemporaryDirectory(prefix="ncsn-inception-")  # removed with this object
            self.weights, self.fidelity_name = _private_weights(state, self._private.name), "inception-v3-compat"
        # the cache key: the weights' content (a re-saved file's bytes differ from save to save)
        if extractor == "classifier":
            with open(self.weights, "rb") as f:
                self.weights_id = sha256_and_size(f)[0][:16]
        else:
            self.weights_id = _tensors_digest(state)

    def _layers(self) -> dict[str, str]:
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        cls = FEATURE_EXTRACTORS_REGISTRY[self.fidelity_name]
        return {metric: cls.get_default_feature_layer_for_metric(metric) for metric in ("fid", "isc", "kid")}

    def features(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        """{layer: (N, d) features} of uint8 NHWC images from the extractor (built once)."""
        from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

        if self._extractor is None:
            self._extractor = create_feature_extractor(self.fidelity_name, sorted(set(self._layers().values())), cuda=self.cuda,
                                                       feature_extractor_weights_path=self.weights, verbose=False)
        return get_featuresdict_from_dataset(UInt8Images(images), self._extractor, 64, self.cuda, True, False)

    def reference_features(self) -> dict[str, torch.Tensor]:
        """The reference split's features, from the cache when it holds exactly those (tensors only), else computed."""
        path = self.cache / f"features-{self.split}-{self.extractor}-{self.weights_id}.pt"
        layers = set(self._layers().values())
        if path.exists():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                if (isinstance(cached, dict) and set(cached) == layers
                        and all(isinstance(v, torch.Tensor) and v.dim() == 2 and len(v) == len(self.reference) for v in cached.values())):
                    return cached
                log.warning("feature cache %s does not hold this reference's features; recomputing", path)
            except Exception as err:  # noqa: BLE001 — not tensors (a pickle is refused here), truncated, …
                log.warning("ignoring unreadable feature cache %s (%s); recomputing", path, type(err).__name__)
        out = self.features(self.reference)
        atomic_write(path, lambda tmp: torch.save(out, tmp))
        return out

    def metrics(self, samples: np.ndarray) -> dict[str, float]:
        """fid_<extractor>, is_<extractor>, is_std_…, kid_…, kid_std_… of ``samples`` (uint8 NHWC) vs the reference split."""
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
        from torch_fidelity.metric_isc import isc_featuresdict_to_metric
        from torch_fidelity.metric_kid import kid_featuresdict_to_metric

        if samples.ndim != 4 or samples.dtype != np.uint8 or samples.shape[1:] != self.reference.shape[1:]:
            raise EvaluationError(f"samples of shape {samples.shape} ({samples.dtype}) do not match the reference images "
                                  f"{self.reference.shape[1:]} (uint8)")
        layers, ours, ref = self._layers(), self.features(samples), self.reference_features()
        raw = {**fid_statistics_to_metric(fid_features_to_statistics(ours[layers["fid"]]),
                                          fid_features_to_statistics(ref[layers["fid"]]), False),
               **isc_featuresdict_to_metric(ours, layers["isc"], verbose=False),
               **kid_featuresdict_to_metric(ours, ref, layers["kid"], verbose=False,
                                            kid_subset_size=min(self.kid_subset_size, len(samples), len(self.reference)))}
        return {f"{short}_{self.extractor}": float(raw[key]) for key, short in _FIDELITY_KEYS.items() if key in raw}

    def baselines(self, num_samples: int, seed: int = 0) -> dict[str, float]:
        """The same metrics for the training split (the floor) and a fitted Gaussian, at ``num_samples``; cached."""
        path = self.cache / f"baselines-{self.split}-{self.extractor}-{self.weights_id}-{num_samples}-{seed}.json"
        if path.exists():
            return json.loads(path.read_text())
        log.info("baselines at %d samples: the training split and a fitted Gaussian against the %s split (cached)", num_samples, self.split)
        train, _ = read_split(self.shards, "train")
        rng = np.random.default_rng(seed)
        floor = train[rng.choice(len(train), size=min(num_samples, len(train)), replace=False)]
        out = {f"train_floor_{k}": v for k, v in self.metrics(floor).items()}
        out.update({f"gaussian_{k}": v for k, v in self.metrics(fitted_gaussian_samples(train, num_samples, rng)).items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
        return out


def _evaluate(shards: str, samples: np.ndarray, extractor: str, inception_weights: dict[str, torch.Tensor] | None,
              cache_dir: str | None, kid_subset_size: int, use_gpu: bool, baseline_samples: int, seed: int) -> dict[str, float]:
    evaluator = Evaluator(shards, extractor, inception_weights, cache_dir=Path(cache_dir) if cache_dir else None,
                          kid_subset_size=kid_subset_size, use_gpu=use_gpu)
    out = {**evaluator.metrics(samples), **evaluator.extra}
    return {**out, **evaluator.baselines(baseline_samples, seed=seed)} if baseline_samples else out


def evaluate_on_worker(shards: str, samples: np.ndarray, extractor: str = "classifier", inception_weights: str | None = None,
                       cache_dir: Path | None = None, kid_subset_size: int = 100, use_gpu: bool = False, baseline_samples: int = 0,
                       seed: int = 0, num_cpus: float = 1) -> dict[str, float]:
    """Evaluator.metrics (and, with ``baseline_samples``, its baselines) in a Ray task with the given resources (a GPU
    when ``use_gpu``): the samples go there through Ray's object store, the reference is read from ``shards`` (a path or
    URL) there, and only the metrics come back. Inception weights given as a file are verified here, on the driver."""
    import ray

    state = check_inception_weights(inception_weights) if inception_weights else None
    task = ray.remote(num_cpus=num_cpus, num_gpus=1 if use_gpu else 0, max_retries=0)(_evaluate)
    try:
        return ray.get(task.remote(shards, ray.put(samples), extractor, state, str(cache_dir) if cache_dir else None,
                                   kid_subset_size, use_gpu, baseline_samples, seed))
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
