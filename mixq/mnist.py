"""The MNIST course model: a 784-512-256-10 MLP, its data, training, and its quantized copies.

Steps (`mixq.experiments.mnist.run_pipeline` runs them all, ``python -m mixq mnist``; each is
a public function the notebook calls too):

1. `load_mnist`: the original gzip IDX files found by `mixq.data.find_data("mnist")`, parsed by
   `read_idx` (numpy, magic numbers and sizes checked); downloaded through torchvision only
   when nothing is found and `mixq.data.network_available()`.
2. `train_mlp`: FP32 MLP (ReLU), Adam + one-cycle LR, a few epochs on CPU, fixed seeds.
3. `quantize_mlp`: a copy of the model with every `nn.Linear` swapped for a `mixq.nn` module:
   FP16, W8A8 (int8 rows / int8 tokens), W4A16 (int4 8x8 tiles), W4A4 (int4 tiles, int4
   tokens) with a fraction of each layer's input channels kept in FP16, chosen statically as
   the channels with the largest calibration max |x| (`mixq.outliers.outliers_topk`).
4. `evaluate`: accuracy, median time per batch, logit SQNR vs FP32; the pipeline collects the
   rows, writes JSON and the accuracy-vs-outlier-fraction plot.
5. `inject_outliers` / `layer_error`: the lesson of the outlier path (see below).

The first layer's input is pixels (normalized, in [-0.42, 2.82]): no heavy-tailed channels, so
its "outliers" are just the brightest pixel positions; per-token int4 of an image is fine.
The hidden layers' inputs are ReLU outputs whose channel maxima spread over only a factor of
2-3: a small MLP has no real outliers, and W4A4 RTN is already close to FP32. LLM hidden states
do have them (a few channels ~50x the median), so `inject_outliers` builds a copy of the MLP
that computes the same function but carries such channels; on it RTN collapses and the FP16
outlier path recovers the accuracy.
"""
from __future__ import annotations

import copy
import gzip
import math
import statistics
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mixq import data as _data
from mixq import nn as qnn
from mixq import outliers as _outliers
from mixq import quant
from mixq import config as _config
from mixq.config import QuantSpec
from mixq.validation import FLOAT_DTYPES, check_tensor

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: The course's int4 weight grid: 8x8 tiles (notebook 01). The library default
#: (`mixq.config.default_specs`, groups of 128) is wider than this MLP's first layers need.
MNIST_W4_SPEC = QuantSpec(4, True, "tile", tile=(8, 8))
#: "fp32" (the trained model itself) and the modes of `mixq.config.MODES`.
MODES = ("fp32", *_config.MODES)

# IDX type codes -> numpy dtype (big-endian on disk).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ----------------------------------------------------------------------------- data
def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (gzip-compressed or raw) into a numpy array.

    Format: 2 zero bytes, a type code byte (0x08 uint8, ...), a byte with the number of dims d,
    then d big-endian uint32 sizes, then the data, row-major. MNIST images are (n, 28, 28) uint8
    (magic 0x00000803), labels (n,) uint8 (magic 0x00000801).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not gzip / truncated gzip, bad magic, unknown type, or size mismatch --
            naming the file and what was wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"corrupted gzip IDX file {path}: {e}") from e
    if len(raw) < 4:
        raise ValueError(f"corrupted IDX file {path}: only {len(raw)} bytes, no header")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"corrupted IDX file {path}: magic number must start with two zero "
                         f"bytes, got {raw[:4].hex()}")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"corrupted IDX file {path}: unknown type code 0x{code:02x}")
    if not 1 <= ndim <= 4:
        raise ValueError(f"corrupted IDX file {path}: {ndim} dims in header (expected 1..4)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"corrupted IDX file {path}: truncated header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"corrupted IDX file {path}: header says shape {shape} "
                         f"({expected} data bytes) but the file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _mnist_folder(folder: Path) -> Path | None:
    """The folder (itself, or torchvision's MNIST/raw inside it) holding the four files."""
    for cand in (folder, folder / "MNIST" / "raw", folder / "raw"):
        if all((cand / f).is_file() or (cand / f[:-3]).is_file() for f in MNIST_FILES.values()):
            return cand
    return None


def _idx_path(folder: Path, name: str) -> Path:
    gz = folder / name
    return gz if gz.is_file() else folder / name[:-3]


def download_mnist(dest: str | Path | None = None) -> Path:
    """Download MNIST with torchvision into `dest` (default `default_download_dir()/"mnist"`).

    Returns the folder holding the IDX files. torchvision is imported only here.
    """
    dest = Path(dest) if dest is not None else _data.default_download_dir() / "mnist"
    import torchvision  # lazy: its wheel may not match torch; only needed to download

    for train in (True, False):
        torchvision.datasets.MNIST(root=str(dest), train=train, download=True)
    found = _mnist_folder(dest)
    if found is None:
        raise FileNotFoundError(f"torchvision download finished but no IDX files under {dest}")
    return found


def find_mnist(root: str | Path | None = None) -> Path:
    """Folder with the MNIST IDX files: `root` if given, else the data locator, else a download
    (only if the network is reachable). Raises FileNotFoundError otherwise."""
    if root is not None:
        found = _mnist_folder(Path(root))
        if found is None:
            raise FileNotFoundError(f"no MNIST IDX files ({', '.join(MNIST_FILES.values())}) "
                                    f"in {root} or {Path(root) / 'MNIST' / 'raw'}")
        return found
    located = _data.find_data("mnist", required=False)
    if located is not None and _mnist_folder(located) is not None:
        return _mnist_folder(located)
    if _data.network_available():
        return download_mnist()
    _data.find_data("mnist")  # raises FileNotFoundError listing where it looked
    raise FileNotFoundError(f"MNIST folder {located} lacks some of {list(MNIST_FILES.values())}")


def load_mnist(root: str | Path | None = None):
    """Load MNIST as tensors.

    Returns:
        (train_x, train_y, test_x, test_y): images float32 (n, 28, 28) in [0, 1], labels int64
        (n,) in 0..9; n = 60000 train, 10000 test.
    """
    folder = find_mnist(root)
    arrays = {k: read_idx(_idx_path(folder, f)) for k, f in MNIST_FILES.items()}
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"MNIST {split} files in {folder} have images {x.shape} and "
                             f"labels {y.shape}; expected (n, 28, 28) and (n,)")
        if y.size and y.max() > 9:
            raise ValueError(f"MNIST {split} labels in {folder} exceed 9 (max {y.max()})")
        out += [torch.from_numpy(x.astype(np.float32) / 255.0),
                torch.from_numpy(y.astype(np.int64))]
    return tuple(out)


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times measure the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_device() -> torch.device:
    """CUDA when a GPU is present (then W4A4 layers with per-row/group weights run on the
    Triton kernels), else the CPU (pure-torch reference)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def half_dtype() -> torch.dtype:
    """torch.float16 if a float16 matmul runs on the CPU here, else torch.bfloat16."""
    try:
        torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
        return torch.float16
    except RuntimeError:
        return torch.bfloat16


# ----------------------------------------------------------------------------- model
class MLP(nn.Module):
    """784-512-256-10 ReLU MLP with the MNIST normalization inside.

    forward: x float (B, 28, 28) or (B, 784) in [0, 1] -> logits float32 (B, 10);
    layers[0] sees (x - 0.1307) / 0.3081.
    """

    def __init__(self, sizes: tuple[int, ...] = (784, 512, 256, 10)) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                mods.append(nn.ReLU())
        self.sizes = tuple(sizes)
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return self.layers((x - MNIST_MEAN) / MNIST_STD)

    def linears(self) -> list[nn.Module]:
        """The linear layers (plain or quantized), in order."""
        return [m for m in self.layers if not isinstance(m, nn.ReLU)]


def _check_xy(x, y, name: str) -> None:
    check_tensor(x, f"{name}_x", ndim=(2, 3), dtypes=(torch.float32,))
    check_tensor(y, f"{name}_y", ndim=1, dtypes=(torch.int64,))
    if len(x) != len(y):
        raise ValueError(f"{name}_x has {len(x)} rows but {name}_y has {len(y)}")


def train_mlp(train_x: torch.Tensor, train_y: torch.Tensor, *, epochs: int = 4,
              batch_size: int = 128, lr: float = 2e-3, sizes: tuple[int, ...] = (784, 512, 256, 10),
              seed: int = 0, progress: bool = True) -> MLP:
    """Train an `MLP` in FP32: Adam, one-cycle learning rate (peak `lr`), cross-entropy.

    Args:
        train_x: float32 (n, 28, 28) or (n, 784) in [0, 1]; train_y: int64 (n,) in 0..9.
        epochs, batch_size: passes over the data and mini-batch size (last partial batch kept).
        seed: seeds the initialization and the shuffling (same seed -> same model on one machine).
    Returns:
        the trained model in eval mode.
    """
    _check_xy(train_x, train_y, "train")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MLP(sizes).to(train_x.device)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs,
                                                steps_per_epoch=steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in tqdm(range(epochs), desc="train epochs", disable=not progress):
        order = torch.randperm(len(train_x), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}", leave=False,
                   disable=not progress)
        for step in bar:
            idx = order[step * batch_size:(step + 1) * batch_size].to(train_x.device)
            loss = loss_fn(model(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.inference_mode()
def evaluate(model: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor, *,
             batch_size: int = 256, ref_logits: torch.Tensor | None = None,
             progress: bool = False) -> dict:
    """Accuracy and speed of `model` on (test_x, test_y).

    Args:
        model: maps float32 (B, 28, 28) images to logits (B, C).
        test_x: float32 (n, 28, 28) or (n, 784); test_y: int64 (n,).
        batch_size: examples per forward (the timed unit).
        ref_logits: optional float (n, C) logits of a reference model (e.g. FP32) to compare to.
    Returns:
        {"accuracy": fraction correct in [0, 1], "ms_per_batch": median wall time of one
        forward (ms), "n": number of examples, "logits": float32 (n, C)}; with `ref_logits` also
        "logit_sqnr_db" (`quant.sqnr_db(ref_logits, logits)`) and "agreement" (fraction of
        examples whose argmax equals the reference's).
    """
    _check_xy(test_x, test_y, "test")
    if ref_logits is not None:
        check_tensor(ref_logits, "ref_logits", ndim=2, dtypes=FLOAT_DTYPES)
        if len(ref_logits) != len(test_x):
            raise ValueError(f"ref_logits has {len(ref_logits)} rows, test_x {len(test_x)}")
    model.eval()
    outs, times = [], []
    for i in tqdm(range(0, len(test_x), batch_size), desc="eval", leave=False,
                  disable=not progress):
        _sync(test_x.device)
        t0 = time.perf_counter()
        outs.append(model(test_x[i:i + batch_size]))
        _sync(test_x.device)
        times.append((time.perf_counter() - t0) * 1e3)
    logits = torch.cat(outs).float()
    res = {"accuracy": int((logits.argmax(dim=1) == test_y).sum()) / len(test_x),
           "ms_per_batch": statistics.median(times), "n": len(test_x), "logits": logits}
    if ref_logits is not None:
        res["logit_sqnr_db"] = quant.sqnr_db(ref_logits.float(), logits)
        res["agreement"] = int((logits.argmax(1) == ref_logits.argmax(1)).sum()) / len(test_x)
    return res


# ----------------------------------------------------------------------------- quantize
@torch.inference_mode()
def calibration_stats(model: MLP, calib_x: torch.Tensor, *, batch_size: int = 256) -> list[torch.Tensor]:
    """Per input channel max |x| at every linear of `model`, over `calib_x`.

    Args:
        calib_x: float32 (n, 28, 28) or (n, 784) images in [0, 1] (a few training batches).
    Returns:
        one float32 tensor (in_features,) per linear layer, in order.
    """
    check_tensor(calib_x, "calib_x", ndim=(2, 3), dtypes=(torch.float32,))
    linears = model.linears()
    stats = [torch.zeros(m.in_features, device=m.weight.device) for m in linears]

    def hook(i):
        def fn(_mod, args):
            stats[i] = torch.maximum(stats[i], args[0].detach().abs().amax(dim=0).float())
        return fn

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(linears)]
    try:
        for j in range(0, len(calib_x), batch_size):
            model(calib_x[j:j + batch_size])
    finally:
        for h in handles:
            h.remove()
    return stats


def quantize_mlp(model: MLP, mode: str, outlier_frac: float = 0.0,
                 calib_x: torch.Tensor | None = None, *, weight_spec: QuantSpec | None = None,
                 act_bits: int = 4, stats: list[torch.Tensor] | None = None) -> MLP:
    """A copy of `model` with every linear replaced by its `mode` version.

    Args:
        model: a trained `MLP` (left unchanged).
        mode: one of MODES ("fp32" returns a plain copy; "fp16"/"bf16" half precision;
            "w8a8"; "w4a16"; "w4a4").
        outlier_frac: w4a4 only, in [0, 0.5]: per layer, k = outliers_topk(fraction=...) input
            channels with the largest calibration max |x| stay FP16 (0 -> plain RTN).
        calib_x: float32 images for calibration (needed when outlier_frac > 0 and no `stats`).
        weight_spec: weight quantizer (default: int8 rows for w8a8, `MNIST_W4_SPEC` (int4 8x8
            tiles) for w4a16/w4a4).
        act_bits: activation bits for w4a4.
        stats: precomputed `calibration_stats(model, calib_x)` (saves a pass).
    """
    if not isinstance(model, MLP):
        raise TypeError(f"model must be a mixq.mnist.MLP, got {type(model).__name__}")
    if not isinstance(mode, str) or mode.lower() not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    mode = mode.lower()
    if not isinstance(outlier_frac, (int, float)) or not 0.0 <= outlier_frac <= 0.5:
        raise ValueError(f"outlier_frac must be a number in [0, 0.5], got {outlier_frac!r}")
    if outlier_frac > 0 and mode != "w4a4":
        raise ValueError(f"outlier_frac applies to mode 'w4a4' only, got mode {mode!r}")
    if outlier_frac > 0 and stats is None:
        if calib_x is None:
            raise ValueError("calib_x is required to choose outlier channels (outlier_frac > 0)")
        stats = calibration_stats(model, calib_x)
    qmodel = copy.deepcopy(model).eval()
    if mode == "fp32":
        return qmodel
    positions = [p for p, m in enumerate(qmodel.layers) if isinstance(m, nn.Linear)]
    for li, pos in enumerate(positions):
        layer = qmodel.layers[pos]
        idx = (_outliers.outliers_topk(stats[li], fraction=outlier_frac)
               if outlier_frac > 0 else None)
        spec = weight_spec if weight_spec is not None or mode == "w8a8" else MNIST_W4_SPEC
        qmodel.layers[pos] = qnn.quantize_linear(layer, mode, weight_spec=spec,
                                                 act_bits=act_bits if mode == "w4a4" else None,
                                                 outlier_idx=idx)
    return qmodel


def weight_nbytes(model: nn.Module) -> int:
    """Bytes of all linear weights, biases, scales and FP16 outlier weights of `model`."""
    return qnn.module_weight_nbytes(model)


def inject_outliers(model: MLP, *, n_channels: int = 4, scale: float = 32.0,
                    seed: int = 0) -> tuple[MLP, list[torch.Tensor]]:
    """A copy of `model` computing the same function but with LLM-like activation outliers.

    For every hidden activation h = relu(L_i(x)) that feeds L_{i+1}, `n_channels` random
    channels c (seeded) are rescaled: rows c of L_i (weight and bias) times `scale`, columns c
    of L_{i+1} divided by `scale`. Since relu(s z) = s relu(z) for s > 0, the FP32 logits are
    unchanged (up to rounding), but those channels of h are `scale` times larger than the rest
    -- like the few huge channels of an LLM's hidden states (max/median ~50 in SmolLM2).

    Args:
        model: a trained `MLP` (left unchanged).
        n_channels: channels per hidden layer to blow up, 1..width.
        scale: factor > 0.
    Returns:
        (new model, [int64 (n_channels,) channel indices per hidden layer, ascending]).
    """
    if not isinstance(model, MLP):
        raise TypeError(f"model must be a mixq.mnist.MLP, got {type(model).__name__}")
    if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    linears = [m for m in model.linears() if isinstance(m, nn.Linear)]
    if len(linears) != len(model.linears()):
        raise TypeError("inject_outliers needs an unquantized MLP (plain nn.Linear layers)")
    widths = [m.out_features for m in linears[:-1]]
    if not isinstance(n_channels, int) or not 1 <= n_channels <= min(widths):
        raise ValueError(f"n_channels must be an int in 1..{min(widths)}, got {n_channels!r}")
    new = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(seed)
    lins = new.linears()
    chosen = []
    with torch.no_grad():
        for prev, nxt in zip(lins[:-1], lins[1:]):
            idx = torch.sort(torch.randperm(prev.out_features, generator=gen)[:n_channels]).values
            idx = idx.to(prev.weight.device)
            prev.weight[idx] *= scale
            if prev.bias is not None:
                prev.bias[idx] *= scale
            nxt.weight[:, idx] /= scale
            chosen.append(idx)
    return new, chosen


@torch.inference_mode()
def layer_error(model: MLP, calib_x: torch.Tensor, *, layer: int = 1,
                fractions: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1),
                weight_spec: QuantSpec | None = None) -> list[dict]:
    """Error of one linear layer quantized to W4A4 with and without FP16 outliers.

    The layer's real inputs X (n, K) are captured on `calib_x`; its FP32 output Y = L(X) is
    compared to W4A4Linear(L, outlier_idx = top `fraction` of channels by max |X|)(X).

    Args:
        model: an `MLP` with plain `nn.Linear` layers.
        calib_x: float32 (n, 28, 28) images.
        layer: index into `model.linears()`.
        fractions: outlier fractions (0 = RTN).
        weight_spec: int4 weight quantizer (default `MNIST_W4_SPEC`, 8x8 tiles).
    Returns:
        one dict per fraction: "outlier_frac", "n_outliers", "sqnr_db", "rel_fro_error", "mae",
        plus "act_max_over_median" (channel max |X| ratio, how outlier-heavy the input is).
    """
    if not isinstance(model, MLP):
        raise TypeError(f"model must be a mixq.mnist.MLP, got {type(model).__name__}")
    lins = model.linears()
    if not isinstance(layer, int) or not 0 <= layer < len(lins):
        raise ValueError(f"layer must be an int in [0, {len(lins)}), got {layer!r}")
    lin = lins[layer]
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"model.linears()[{layer}] must be a plain nn.Linear, got {type(lin).__name__}")
    check_tensor(calib_x, "calib_x", ndim=(2, 3), dtypes=(torch.float32,))
    captured = []
    handle = lin.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        model(calib_x)
    finally:
        handle.remove()
    x = torch.cat(captured)
    y = lin(x)
    stat = x.abs().amax(dim=0)
    rows = []
    for frac in fractions:
        idx = _outliers.outliers_topk(stat, fraction=frac) if frac > 0 else None
        q = qnn.W4A4Linear.from_linear(lin, weight_spec=weight_spec or MNIST_W4_SPEC,
                                       outlier_idx=idx)
        y_q = q(x)
        rows.append({"outlier_frac": float(frac), "n_outliers": q.n_outliers,
                     "sqnr_db": quant.sqnr_db(y, y_q), "rel_fro_error": quant.rel_fro_error(y, y_q),
                     "mae": quant.mae(y, y_q),
                     "act_max_over_median": float(stat.max() / stat.median().clamp_min(1e-12))})
    return rows


def format_layer_error(rows: list[dict]) -> str:
    """A Markdown table of `layer_error` rows."""
    if not isinstance(rows, list) or not rows:
        raise ValueError("rows must be a non-empty list of layer_error rows")
    lines = ["| outliers in FP16 | channels | output SQNR (dB) | rel. Frobenius error | MAE |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['outlier_frac'] * 100:g}% | {r['n_outliers']} | {r['sqnr_db']:.2f} | "
                     f"{r['rel_fro_error']:.4f} | {r['mae']:.4f} |")
    return "\n".join(lines)
