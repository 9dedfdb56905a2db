"""Which precision each component runs in, chosen for the machine: the precision plan.

A CPU with bfloat16 instructions (AVX512-BF16 or AMX) runs bfloat16 at about twice the
speed of float32 where memory bound; a CPU without them (AVX2 only: most laptops, many
servers) emulates bfloat16 in software, and a bfloat16 convolution there costs twenty times
its float32 one. So the plan asks the CPU what it does natively and picks, per component,
the fastest option that keeps the documented token behaviour.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .codec import Codec
    from .models.omni import OmniModel


# What each decoder precision costs on a real model: (mean next-token KL against float32 in nats, top-1 agreement
# in %) on SmolLM2-135M over 16,384 positions of English text, from benchmarks/int8_quality.py (docs/quality.md).
DECODER_QUALITY: dict[str, tuple[float, float]] = {
    "bfloat16": (0.00138, 96.6),
    "int8, weight-only": (0.00763, 93.1),
    "int8, weight-only, calibrated": (0.00672, 93.7),
    "int8, 8-bit activations": (0.0390, 87.5),
    "int8, 7-bit activations": (0.127, 78.7),
    "int8, 8-bit activations, calibrated": (0.0115, 92.5),
    "int8, 7-bit activations, calibrated": (0.0252, 89.8),
}

# Environment that makes PyTorch, oneDNN and fbgemm use no more than AVX2 on a bigger CPU: how
# benchmarks and tests see what most laptops and many servers do.
AVX2_LIMIT = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}


@dataclass(frozen=True)
class Machine:
    """What the CPU does natively, as PyTorch and oneDNN will use it in this process."""

    capability: str  # PyTorch's kernel level: DEFAULT, AVX2, AVX512, ...
    native_bfloat16: bool  # oneDNN runs bfloat16 in hardware (AVX512-BF16 or AMX)
    vnni: bool  # fbgemm's int8 products have 8-bit dot-product instructions (AVX512-VNNI)

    def describe(self) -> str:
        bf16 = "native bfloat16" if self.native_bfloat16 else "no native bfloat16"
        return f"CPU {self.capability}, {bf16}, {'VNNI' if self.vnni else 'no VNNI'}"


@functools.lru_cache(maxsize=1)
def machine() -> Machine:
    """This process's CPU as PyTorch sees it.

    The limits ``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA`` and ``FBGEMM_ENABLE_INSTRUCTIONS``
    are honoured, as PyTorch, oneDNN and fbgemm honour them.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and capability.startswith("AVX512")
    fbgemm = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper()
    vnni = "avx512_vnni" in _cpu_flags() and (not fbgemm or "E1" in fbgemm or "VNNI" in fbgemm)
    return Machine(capability=capability, native_bfloat16=native, vnni=vnni)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


PLAN_DTYPES = ("auto", "float32", "bfloat16")  # what --dtype, --encoder-dtype and --codec-dtype accept
INT8_ACTIVATIONS = ("auto", "on", "off")  # what --int8-activations accepts


@dataclass(frozen=True)
class Plan:
    """The precision of each component.

    ``weights`` is the decoder's linears (``float32``, ``bfloat16`` or ``int8``);
    ``int8_activations`` the bits their input is quantized to per row for fbgemm's int8
    products (8, or 7 without VNNI; 0: weight-only kernels, see :mod:`miniomni.int8act`);
    ``activations`` everything else in the decoder (attention, norms, KV cache, the
    prompt's GEMMs on dequantized int8 weights); ``encoder`` Whisper (bfloat16 means
    autocast); ``codec`` the SNAC stream. ``chosen`` names the components the machine
    decided (the rest were asked for); ``why`` says what decided them.
    """

    weights: str
    activations: torch.dtype
    encoder: torch.dtype
    codec: torch.dtype
    chosen: tuple[str, ...] = ()
    why: str = ""
    int8_activations: int = 0
    calibrated: bool = False  # int8 weights smoothed, with outlier channels (miniomni.smoothing)

    def quality(self) -> str:
        """A few words on what the decoder's precision costs in quality, as measured on a real model."""
        if self.weights == "int8":
            bits = self.int8_activations
            key = f"int8, {bits}-bit activations" if bits else "int8, weight-only"
            key += ", calibrated" if self.calibrated else ""
        else:
            key = "bfloat16" if self.activations == torch.bfloat16 else "float32"
        kl, top1 = DECODER_QUALITY.get(key, (None, None))
        if kl is None:
            return "quality: the reference's arithmetic" if key == "float32" else f"quality of {key}: not measured"
        return (f"quality: next-token KL {kl:.3f} nats against float32, top-1 {top1:.1f} % the same, on a real "
                "135M-parameter model (docs/quality.md)")

    def describe(self) -> str:
        """One line: each component's precision, and why the machine's choices were made."""
        def name(dtype: torch.dtype) -> str:
            return str(dtype).removeprefix("torch.")

        if self.weights != "int8":
            decoder = f"decoder in {name(self.activations)}"
        elif self.int8_activations:
            decoder = (f"int8 linears on {self.int8_activations}-bit activations (fbgemm), the rest of the "
                       f"decoder in {name(self.activations)}")
        else:
            decoder = f"int8 weight-only linears, the rest of the decoder in {name(self.activations)}"
        line = f"{decoder}, Whisper in {name(self.encoder)}, codec in {name(self.codec)}"
        return f"{line} ({self.why})" if self.why else line


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 is faster than float32 on ``device`` (on a CPU: only with bfloat16 instructions)."""
    if device.type == "cpu":
        return machine().native_bfloat16
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False  # MPS: bfloat16 support varies by OS version; float32 is the safe choice


@dataclass(frozen=True)
class Precision:
    """The precisions asked for, one value from :func:`miniomni.load` to :func:`choose` ("auto": chosen here)."""

    quantize: str | None = None  # "int8": int8 weights; None: the checkpoint's float weights
    dtype: str | torch.dtype = "auto"  # the decoder's activations
    encoder: str | torch.dtype = "auto"  # Whisper
    codec: str | torch.dtype = "auto"  # SNAC
    int8_activations: str = "auto"  # auto, on, off: int8 weights times int8 activations


def choose(device: torch.device, asked: Precision = Precision()) -> Plan:
    """The plan for ``device``: each ``"auto"`` component in the fastest precision that keeps tokens as documented.

    ``asked.quantize`` is ``"int8"`` or None (the checkpoint's float weights, in the activations'
    dtype). Dense weights stay float32 unless bfloat16 is asked for: the faithful default.
    With int8 weights the activations are bfloat16 where bfloat16 is fast, float32 where it
    is emulated (a decode step costs the same in both there; a prompt's GEMM, Whisper and
    the codec cost 8 to 25 times more in emulated bfloat16). Whisper and the codec run in
    bfloat16 only where the decoder does and bfloat16 is fast. int8 weights multiply 8-bit
    activations (fbgemm: about the same cost for 1 to 16 rows) on an x86 CPU with VNNI; without
    VNNI only when ``int8_activations`` is ``"on"`` (7 bits there, which cost three times the
    8-bit KL divergence on a real model); ``"off"`` keeps the weight-only kernels.
    """
    from . import int8act
    from .devices import resolve_dtype
    from .errors import MiniOmniError

    weights, activations, encoder, codec = asked.quantize, asked.dtype, asked.encoder, asked.codec
    int8_activations = asked.int8_activations
    if int8_activations not in INT8_ACTIVATIONS:
        raise MiniOmniError(f"int8_activations={int8_activations!r}; use {', '.join(INT8_ACTIVATIONS)}")
    fast = fast_bfloat16(device)
    chosen = []
    bits = 0
    if weights == "int8" and int8_activations != "off":
        possible = device.type == "cpu" and int8act.available()
        if int8_activations == "on" and not possible:
            raise MiniOmniError("int8 activations need fbgemm (PyTorch on an x86 CPU); use --int8-activations off")
        if possible and (machine().vnni or int8_activations == "on"):
            bits = 8 if machine().vnni else 7
        if int8_activations == "auto":
            chosen.append("int8_activations")
    if activations == "auto":
        chosen.append("activations")
        activations = torch.bfloat16 if weights == "int8" and fast else torch.float32
    activations = resolve_dtype(activations)
    follow = torch.bfloat16 if activations == torch.bfloat16 and fast else torch.float32
    if encoder == "auto":
        chosen.append("encoder")
        encoder = follow
    if codec == "auto":
        chosen.append("codec")
        codec = follow
    if device.type == "cpu":
        why = f"{machine().describe()}: bfloat16 is {'fast' if fast else 'emulated, float32 is faster'} here"
    else:
        why = f"{device.type}: bfloat16 {'supported' if fast else 'not used'}"
    return Plan(weights=weights or str(activations).removeprefix("torch."), activations=activations,
                encoder=resolve_dtype(encoder), codec=resolve_dtype(codec), chosen=tuple(chosen),
                why=why if chosen else "", int8_activations=bits)


def confirm_codec(codec: Codec, plan: Plan, margin: float = 1.5) -> Plan:
    """Time the codec in both precisions; keep the plan's choice unless the other is ``margin`` times faster.

    Only a codec precision the plan chose itself is changed (an asked-for one stays). Costs
    a few tens of milliseconds where bfloat16 is fast, about a second where it is emulated.
    """
    if "codec" not in plan.chosen or codec.device.type != "cpu":
        return plan
    costs = {}
    for dtype in (plan.codec, torch.float32 if plan.codec == torch.bfloat16 else torch.bfloat16):
        codec.set_stream_dtype(dtype)
        costs[dtype] = codec.stream_ms_per_frame()
    other = next(dtype for dtype in costs if dtype != plan.codec)
    best = other if costs[other] * margin < costs[plan.codec] else plan.codec
    codec.set_stream_dtype(best)
    measured = ", ".join(f"{str(d).removeprefix('torch.')} {ms:.0f} ms" for d, ms in costs.items())
    return dataclasses.replace(plan, codec=best, why=f"{plan.why}; codec per frame measured: {measured}")


def confirm_prompts(model: OmniModel, plan: Plan, positions: int = 128, margin: float = 1.1) -> Plan:
    """Where prompts go to bfloat16 GEMMs on dequantized weights, time a prefill that way and on the int8 products.

    The int8-activation products take a prompt's rows too where that is ``margin`` times
    faster: on CPUs with bfloat16 dot products but no AMX the int8 ones are faster, with AMX
    the bfloat16 GEMM. Their quality is the plan's (it was measured on whole prompts).
    """
    import time

    from .int8act import products
    from .tokens import padding_ids

    found = [p for p in products(model.llm) if p.max_rows is not None]
    device = model.llm.embed.weight.device
    if not found or device.type != "cpu":
        return plan
    limit = found[0].max_rows
    streams = padding_ids(device).view(1, -1, 1).expand(1, -1, positions)
    cache = model.new_cache(1, max_length=positions)

    def prefill_ms() -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            with torch.inference_mode():
                model.hidden_states(streams, torch.arange(positions, device=device), cache, kv_len=positions)
            times.append(time.perf_counter() - started)
        return 1000 * min(times[1:])

    costs = {}
    for rows in (limit, None):
        for product in found:
            product.max_rows = rows
        costs[rows] = prefill_ms()
    best = None if costs[None] * margin < costs[limit] else limit
    for product in found:
        product.max_rows = best
    measured = (f"a {positions}-position prompt measured: bfloat16 GEMM {costs[limit]:.0f} ms, int8 products "
                f"{costs[None]:.0f} ms, so {'int8' if best is None else 'bfloat16'}")
    return dataclasses.replace(plan, why=f"{plan.why}; {measured}")
