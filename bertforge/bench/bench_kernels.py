"""Kernel benchmarks: each fused op against its baselines, forward and forward+backward, BERT-base/large shapes.

    pytest bertforge/bench/bench_kernels.py --benchmark-enable          (on a CUDA GPU; every case skips elsewhere)
    pytest bertforge/bench/bench_kernels.py --benchmark-enable -k "attention and 512 and not compile"

384 cases; the torch.compile ones compile each case afresh (tens of seconds each): select with -k.

One pytest-benchmark group per case (op, pass, dtype, model, shape, layout) holds its providers side by side;
the end of the run prints each provider's time as a ratio to bertforge's. Every provider's forward output is
first checked against the reference, so a ratio never compares different computations.
Throughput in extra_info: attention in TFLOP/s of useful work (real tokens only: 4*H*D*sum_b L_b^2 forward,
x3.5 for forward+backward); layer norm and GELU in GB/s of interface bytes (see `_interface_bytes`); each also as a
fraction of the device's data-sheet peak (PEAKS) when the device is known. Two ceiling cases measure what the
device really reaches in the same run (a large bf16 matmul, a device-to-device copy); `bertforge bench` reports
every figure against them.
"""

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

from bertforge import kernels
from bertforge.kernels import reference
from bertforge.kernels.padding import pad, padded_to_varlen, varlen_to_padded

BATCH = 32
HEAD_DIM = 64
SEQ_LENS = (128, 512)
MODELS = {"base": dict(heads=12, hidden=768, ffn=3072), "large": dict(heads=16, hidden=1024, ffn=4096)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PASSES = {"fwd": False, "fwd+bwd": True}  # id -> with backward
LAYOUTS = ("dense", "padded", "varlen")  # no padding; key_padding_mask; packed with cu_seqlens
# Relative error norm allowed between a provider's forward output and the reference's: a guard that every
# provider computes the same thing, not a precision claim (tests/kernels holds those).
SAME_RESULT = {torch.float16: 1e-2, torch.bfloat16: 4e-2}
WARMUP_CALLS = 3  # untimed: Triton autotuning, torch.compile, library heuristics happen here


# Data-sheet peaks, dense (no sparsity): (bf16/fp16 tensor-core TFLOP/s, memory GB/s), by device name; the first
# key found in torch.cuda.get_device_name() wins, so specific names come first.
PEAKS = {"A100-SXM4-80GB": (312, 2039), "A100-SXM4-40GB": (312, 1555), "A100 80GB PCIe": (312, 1935),
         "A100-PCIE-40GB": (312, 1555), "H100 80GB HBM3": (989, 3350), "H100 PCIe": (756, 2000),
         "H100 NVL": (835, 3900), "H200": (989, 4800)}


def device_peak(name: str) -> tuple[float, float] | None:
    return next((peak for key, peak in PEAKS.items() if key in name), None)


def _with_peak_fraction(extra_info: dict, unit: str):
    peak = device_peak(torch.cuda.get_device_name())
    if peak is not None and unit in ("TFLOP/s", "GB/s"):
        extra_info["fraction_of_peak"] = extra_info[unit] / peak[0 if unit == "TFLOP/s" else 1]


def _compiled(fn):
    """torch.compile with static shapes, fresh per case: one compiled function serving many shapes would hit
    dynamo's recompile limit and fall back to eager, or go dynamic, and the baseline would not be its best."""
    torch.compiler.reset()
    return torch.compile(fn, dynamic=False)


def _relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.double()
    return float((actual - expected).norm() / expected.norm())


def check_and_time(benchmark, group, provider, fn, inputs, backward, expected, to_expected_layout, throughput):
    """Check fn(*inputs) against `expected`, then time it (forward, or forward + backward to every input) with a
    CUDA synchronisation inside the timed call. throughput: (amount, unit, scale, how it was counted)."""
    benchmark.group = group
    benchmark.extra_info["provider"] = provider
    inputs = [t.detach().requires_grad_(backward) for t in inputs]
    out = fn(*inputs)
    error = _relative_error(to_expected_layout(out), expected)
    assert error <= SAME_RESULT[expected.dtype], f"{provider} differs from the reference: relative error {error:.1e}"
    grad_out = torch.randn_like(out) if backward else None

    def step():
        out = fn(*inputs)
        if backward:
            torch.autograd.grad(out, inputs, grad_out)  # no .grad accumulation to time
        torch.cuda.synchronize()

    for _ in range(WARMUP_CALLS):
        step()
    benchmark(step)
    if benchmark.stats:  # None under --benchmark-disable, where the call above ran once as a smoke test
        amount, unit, scale, counted = throughput
        benchmark.extra_info[unit] = amount / benchmark.stats.stats.median / scale
        benchmark.extra_info["counted"] = counted
        _with_peak_fraction(benchmark.extra_info, unit)


# --- what the device reaches: the ceilings every figure is measured against ------------------------------------

CEILING_MATMUL_N = 8192
CEILING_COPY_BYTES = 1 << 30


def test_ceiling_bf16_matmul(benchmark, cuda_device):
    a, b = (torch.randn(CEILING_MATMUL_N, CEILING_MATMUL_N, device=cuda_device, dtype=torch.bfloat16)
            for _ in range(2))
    benchmark.group = "ceiling bf16 matmul"
    benchmark.extra_info.update(provider=f"torch.mm {CEILING_MATMUL_N}", ceiling=True)

    def step():
        torch.mm(a, b)
        torch.cuda.synchronize()

    step()
    benchmark(step)
    if benchmark.stats:
        benchmark.extra_info["TFLOP/s"] = 2 * CEILING_MATMUL_N ** 3 / benchmark.stats.stats.median / 1e12
        _with_peak_fraction(benchmark.extra_info, "TFLOP/s")


def test_ceiling_device_copy(benchmark, cuda_device):
    source = torch.empty(CEILING_COPY_BYTES, dtype=torch.uint8, device=cuda_device)
    target = torch.empty_like(source)
    benchmark.group = "ceiling device copy"
    benchmark.extra_info.update(provider="copy 1 GiB", ceiling=True)

    def step():
        target.copy_(source)
        torch.cuda.synchronize()

    step()
    benchmark(step)
    if benchmark.stats:  # read once and written once
        benchmark.extra_info["GB/s"] = 2 * CEILING_COPY_BYTES / benchmark.stats.stats.median / 1e9
        _with_peak_fraction(benchmark.extra_info, "GB/s")


# --- attention --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class AttentionCase:
    layout: str
    seq: int
    lengths: torch.Tensor  # (batch,) real tokens per sequence, on the host
    cu_seqlens: torch.Tensor  # (batch+1,) int32
    mask: torch.Tensor  # (batch, seq) bool, True = real token (all True for "dense")
    packed: list  # q, k, v (total, heads, head_dim)
    padded: list  # q, k, v (batch, heads, seq, head_dim), zeros at padding
    expected: torch.Tensor  # reference output, packed (total, heads, head_dim)

    @property
    def flops(self) -> float:
        """Forward FLOPs between real tokens only: two matmuls of 2*L*L*D per head and sequence."""
        heads, head_dim = self.packed[0].shape[1:]
        return 4.0 * heads * head_dim * float((self.lengths.double() ** 2).sum())


@functools.lru_cache(maxsize=1)  # providers of one case run one after another
def attention_case(layout, batch, seq, heads, head_dim, dtype, device) -> AttentionCase:
    """Random q, k, v; padded and varlen cases get lengths uniform in [seq/4, seq], one sequence full."""
    generator = torch.Generator().manual_seed(seq * 1000 + heads)
    lengths = torch.full((batch,), seq)
    if layout != "dense":
        lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=generator)
        lengths[0] = seq
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(device, torch.int32)
    packed = [torch.randn(int(lengths.sum()), heads, head_dim, generator=generator).to(device, dtype)
              for _ in range(3)]
    padded, mask = zip(*(varlen_to_padded(t, cu_seqlens, seq) for t in packed))
    expected = reference.attention(*packed, cu_seqlens=cu_seqlens, max_seqlen=seq)
    return AttentionCase(layout, seq, lengths, cu_seqlens, mask[0], packed, [t.contiguous() for t in padded],
                         expected)


def _attention_api(op, case):
    """An op with bertforge's signature (bertforge, its reference, a compiled reference) on the case's layout."""
    if case.layout == "varlen":
        return (lambda q, k, v: op(q, k, v, cu_seqlens=case.cu_seqlens, max_seqlen=case.seq)), case.packed, None
    mask = case.mask if case.layout == "padded" else None
    return (lambda q, k, v: op(q, k, v, key_padding_mask=mask)), case.padded, "padded"


def _attention_sdpa(case):
    if case.layout == "varlen":
        # PyTorch's own varlen path: nested jagged tensors (batch, heads, j, head_dim) over the packed buffers.
        offsets, min_len = case.cu_seqlens.long(), int(case.lengths.min())

        def nested(t):
            return torch.nested.nested_tensor_from_jagged(t, offsets, min_seqlen=min_len, max_seqlen=case.seq)

        def fn(q, k, v):
            out = F.scaled_dot_product_attention(*(nested(t).transpose(1, 2) for t in (q, k, v)))
            return out.transpose(1, 2).values()

        return fn, case.packed, None
    mask = case.mask[:, None, None, :] if case.layout == "padded" else None
    return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), case.padded, "padded"


def _attention_flash(case):
    flash_attn = pytest.importorskip("flash_attn")
    cu, seq = case.cu_seqlens, case.seq
    if case.layout == "varlen":
        return (lambda q, k, v: flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, seq, seq)), case.packed, None
    bshd = [t.transpose(1, 2).contiguous() for t in case.padded]  # flash-attn's (batch, seq, heads, head_dim)
    if case.layout == "dense":
        return flash_attn.flash_attn_func, bshd, "bshd"
    # flash_attn_func takes no key padding mask: unpad, run varlen, pad back, as flash-attn's own BERT does.
    indices = case.mask.flatten().nonzero().flatten()

    def fn(q, k, v):
        out = flash_attn.flash_attn_varlen_func(*(t.flatten(0, 1)[indices] for t in (q, k, v)), cu, cu, seq, seq)
        return pad(out, indices, *case.mask.shape)

    return fn, bshd, "bshd"


ATTENTION_PROVIDERS = {
    "bertforge": lambda case: _attention_api(kernels.attention, case),
    "reference": lambda case: _attention_api(reference.attention, case),
    "torch.compile": lambda case: _attention_api(_compiled(reference.attention), case),
    "sdpa": _attention_sdpa,
    "flash_attn": _attention_flash,
}


@pytest.mark.parametrize("provider", ATTENTION_PROVIDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seq", SEQ_LENS)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pass_", PASSES)
def test_attention(benchmark, cuda_device, pass_, dtype, model, seq, layout, provider):
    case = attention_case(layout, BATCH, seq, MODELS[model]["heads"], HEAD_DIM, DTYPES[dtype], cuda_device)
    fn, inputs, out_layout = ATTENTION_PROVIDERS[provider](case)
    # Outputs are compared on real tokens only, packed: what a padded query row holds is not part of the op.
    to_packed = {None: lambda out: out, "padded": lambda out: padded_to_varlen(out, case.mask),
                 "bshd": lambda out: out[case.mask]}[out_layout]
    backward = PASSES[pass_]
    flops = case.flops * (3.5 if backward else 1.0)  # backward = 2.5 x forward
    check_and_time(benchmark, f"attention {pass_} {dtype} {model} S={seq} {layout}", provider, fn, inputs,
                   backward, case.expected, to_packed,
                   (flops, "TFLOP/s", 1e12, "real tokens: 4*H*D*sum(L_b^2), x3.5 with backward"))


# --- residual + layer norm, bias + GELU ---------------------------------------------------------------------------

def _interface_bytes(inputs, output, backward) -> int:
    """Bytes every implementation must move: inputs read and output written once; the backward reads the output
    gradient and the inputs again and writes one gradient per input. So 3 * inputs + 2 * output with backward."""
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    return (3 if backward else 1) * nbytes(inputs) + (2 if backward else 1) * nbytes([output])


@functools.lru_cache(maxsize=1)
def rowwise_case(tokens, width, dtype, device, with_weight):
    """x, residual-or-bias inputs for layer norm (x, residual, weight, bias) or bias_gelu (x, bias)."""
    generator = torch.Generator().manual_seed(tokens + width)
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype)  # noqa: E731
    if with_weight:
        return randn(tokens, width), randn(tokens, width), 1 + 0.1 * randn(width), 0.1 * randn(width)
    return randn(tokens, width), randn(width)


def _layer_norm_with(op):
    """An op with bertforge's layer_norm signature, called as (x, residual, weight, bias)."""
    return lambda x, residual, weight, bias: op(x, weight, bias, 1e-12, residual=residual)


def _torch_layer_norm(x, residual, weight, bias):
    return F.layer_norm(x + residual, weight.shape, weight, bias, 1e-12)  # eager, native dtype


def _apex_layer_norm():
    # The function apex.normalization.FusedLayerNorm.forward calls; apex has no fused residual add.
    fused = pytest.importorskip("apex.normalization.fused_layer_norm")
    return lambda x, residual, weight, bias: fused.fused_layer_norm_affine(x + residual, weight, bias,
                                                                           weight.shape, 1e-12)


LAYER_NORM_PROVIDERS = {
    "bertforge": lambda: _layer_norm_with(kernels.layer_norm),
    "reference": lambda: _layer_norm_with(reference.layer_norm),
    "torch.compile": lambda: _layer_norm_with(_compiled(reference.layer_norm)),
    "torch": lambda: _torch_layer_norm,
    "apex": _apex_layer_norm,
}

BIAS_GELU_PROVIDERS = {
    "bertforge": lambda: kernels.bias_gelu,
    "reference": lambda: reference.bias_gelu,
    "torch.compile": lambda: _compiled(reference.bias_gelu),
    "torch": lambda: lambda x, b: F.gelu(x + b),  # eager, native dtype
}


def _run_rowwise(benchmark, name, providers, provider, reference_op, inputs, pass_, dtype, shape_label):
    fn = providers[provider]()
    backward = PASSES[pass_]
    expected = reference_op(*inputs)
    nbytes = _interface_bytes(inputs, expected, backward)
    check_and_time(benchmark, f"{name} {pass_} {dtype} {shape_label}", provider, fn, inputs, backward, expected,
                   lambda out: out, (nbytes, "GB/s", 1e9, "interface bytes, see _interface_bytes"))


@pytest.mark.parametrize("provider", LAYER_NORM_PROVIDERS)
@pytest.mark.parametrize("seq", SEQ_LENS)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pass_", PASSES)
def test_layer_norm(benchmark, cuda_device, pass_, dtype, model, seq, provider):
    hidden = MODELS[model]["hidden"]
    inputs = rowwise_case(BATCH * seq, hidden, DTYPES[dtype], cuda_device, with_weight=True)
    _run_rowwise(benchmark, "layer_norm+residual", LAYER_NORM_PROVIDERS, provider,
                 _layer_norm_with(reference.layer_norm), inputs, pass_, dtype,
                 f"{model} {BATCH}x{seq} tokens x {hidden}")


@pytest.mark.parametrize("provider", BIAS_GELU_PROVIDERS)
@pytest.mark.parametrize("seq", SEQ_LENS)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pass_", PASSES)
def test_bias_gelu(benchmark, cuda_device, pass_, dtype, model, seq, provider):
    ffn = MODELS[model]["ffn"]
    inputs = rowwise_case(BATCH * seq, ffn, DTYPES[dtype], cuda_device, with_weight=False)
    _run_rowwise(benchmark, "bias_gelu", BIAS_GELU_PROVIDERS, provider, reference.bias_gelu, inputs, pass_, dtype,
                 f"{model} {BATCH}x{seq} tokens x {ffn}")
