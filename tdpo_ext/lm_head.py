"""The LM head of a transformers causal LM, for the fused LM-head loss: the body whose last
hidden state the head reads, the head's weight and bias, and what the model does to the
head's output (a scale, a soft-cap). Duck-typed: nothing here imports transformers."""
from __future__ import annotations

import functools
import types
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor

# The dtypes an LM head may have for the fused loss, and its tiled ops compute in.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Config fields that scale the logits, in the order TRL 1.16's add_fused_lm_head reads them
# (the first one set wins), each with how it turns into a factor: Cohere's logit_scale,
# Muse Glimmer's output_multiplier and Falcon-H1's lm_head_multiplier multiply; Granite's
# and MiniCPM3's logits_scaling divides, except HyperCLOVA X's, which multiplies.
_SCALE_FIELDS = (
    ("logit_scale", lambda value, model_type: value),
    ("output_multiplier", lambda value, model_type: value),
    ("lm_head_multiplier", lambda value, model_type: value),
    ("logits_scaling", lambda value, model_type: value if model_type == "hyperclovax"
     else 1.0 / value),
)
_SOFTCAP_FIELD = "final_logit_softcapping"  # Gemma 2/3: cap * tanh(logits / cap)
# Fields that change the logits in ways that are not a scale and a soft-cap of the head's
# output, each with its "off" value: such models are not fused.
_UNSUPPORTED_FIELDS = {
    "logit_softcapping": None,
    "logits_mup_width_multiplier": 1.0,
    "dim_model_base": None,               # MiniCPM: hidden / (hidden_size / dim_model_base)
    "mup_enabled": False,
}


class LMHead(NamedTuple):
    """What fused_linear_tdpo_loss needs of a model: logits =
    softcap(logit_scale * (body(...).last_hidden_state @ weight.T + bias))."""
    body: torch.nn.Module
    weight: Tensor
    bias: Optional[Tensor]
    logit_scale: float
    logit_softcap: Optional[float]


def _text_config(model):
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def logit_transform_of(model) -> tuple[float, Optional[float]]:
    """(logit_scale, logit_softcap) that ``model``'s config applies to its LM head's output
    (1.0 and None where it applies none), as fused_linear_sequence_stats takes them.

    Raises ValueError, naming the model class and the field, for a config that changes the
    logits in another way."""
    config = _text_config(model)
    name = type(model).__name__
    for field, off in _UNSUPPORTED_FIELDS.items():
        value = getattr(config, field, off)
        if value is not None and value != off and not (off is None and value is False):
            raise ValueError(f"tdpo_ext: cannot fuse the LM head of {name}: its config sets "
                             f"{field}={value!r}, which changes the logits beyond a scale and "
                             "a soft-cap of a linear head")
    scale = 1.0
    model_type = getattr(config, "model_type", None)
    for field, factor in _SCALE_FIELDS:
        value = getattr(config, field, None)
        if value is not None:
            scale = float(factor(value, model_type))
            break
    softcap = getattr(config, _SOFTCAP_FIELD, None)
    return scale, (float(softcap) if softcap else None)


def _body_of(model, name: str) -> torch.nn.Module:
    body = None
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            body = get_decoder()
        except Exception:  # noqa: BLE001  (models that need a bespoke rule raise)
            body = None
    if body is None or body is model:
        body = getattr(model, "model", None)
    if not isinstance(body, torch.nn.Module) or body is model:
        base = getattr(model, "base_model", None)
        body = base if isinstance(base, torch.nn.Module) and base is not model else None
    if body is None:
        raise ValueError(f"tdpo_ext: cannot fuse the LM head of {name}: found no body "
                         "(get_decoder(), .model or .base_model) that yields its hidden states")
    return body


def output_linear(model) -> torch.nn.Linear:
    """The model's LM head, refused (ValueError naming the class) unless it is a plain
    torch.nn.Linear with a float weight."""
    name = type(model).__name__
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise ValueError(f"tdpo_ext: cannot fuse the LM head of {name}: it has no output "
                         "embeddings (get_output_embeddings() is None)")
    if type(head) is not torch.nn.Linear:
        raise ValueError(f"tdpo_ext: cannot fuse the LM head of {name}: it is "
                         f"{type(head).__module__}.{type(head).__qualname__}, not a plain "
                         "torch.nn.Linear (adapters, quantized or custom heads are not fused)")
    if head.weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"tdpo_ext: cannot fuse the LM head of {name}: its weight is "
                         f"{head.weight.dtype}")
    return head


def lm_head_of(model, *, verify_input_ids: Optional[Tensor] = None) -> LMHead:
    """The LMHead of a transformers causal LM whose logits are a scale and a soft-cap of
    ``body(...)`` 's last hidden state through a plain ``nn.Linear`` head (tied to the
    input embeddings or not). Look it up once: it walks the body's modules.

    The body is ``model.get_decoder()`` (or ``model.model``, or ``model.base_model``);
    ``body(input_ids, attention_mask=...).last_hidden_state`` is what the head reads.

    Raises ValueError, naming the model class, for heads it cannot fuse: no output
    embeddings, a head that is not exactly ``nn.Linear`` (adapters, quantized layers), a
    config that changes the logits beyond logit_transform_of, logits modified by the model
    itself, or no body to be found. With ``verify_input_ids`` (a few token ids, (1, T)),
    it also checks numerically that the LMHead's logits equal ``model(ids).logits`` and
    refuses if they do not, which catches what the config does not say.
    """
    name = type(model).__name__
    head = output_linear(model)
    scale, softcap = logit_transform_of(model)
    if getattr(model, "logit_softcap", None) is not None or \
            getattr(model, "final_logits_bias", None) is not None:
        raise ValueError(f"tdpo_ext: cannot fuse the LM head of {name}: it modifies the "
                         "logits after the linear head")
    body = _body_of(model, name)
    if head in list(body.modules()):
        raise ValueError(f"tdpo_ext: cannot fuse the LM head of {name}: the body found "
                         f"({type(body).__name__}) contains the head itself")
    found = LMHead(body, head.weight, head.bias, scale, softcap)
    if verify_input_ids is not None:
        verify_lm_head(model, found, verify_input_ids)
    return found


def head_logits(head: LMHead, hidden: Tensor) -> Tensor:
    """The logits that ``head`` makes of last hidden states (materialized: for checks)."""
    logits = F.linear(hidden, head.weight, head.bias) * head.logit_scale
    if head.logit_softcap:
        logits = torch.tanh(logits / head.logit_softcap) * head.logit_softcap
    return logits


def verify_lm_head(model, head: LMHead, input_ids: Tensor, rtol: float = 1e-3) -> None:
    """Raises ValueError unless head_logits(body(input_ids=ids)) equals model(ids).logits,
    to rtol relative to each logit and to the largest (a model whose forward runs under
    bf16 autocast needs about 2e-2; a model that rescales its logits differs by far more).

    One forward call of the model, in the common case: the body's hidden states are read as
    the model's forward computes them, when it calls the body as the fused head will (once,
    on these ids, with no other tensor such as embeddings or positions). Otherwise the body
    runs again on its own, as the fused head runs it."""
    calls = []

    def keep(module, args, kwargs, output):  # a copy: the forward may change it in place
        calls.append((_called_on_ids_only(args, kwargs, input_ids),
                      last_hidden_state(output).clone()))

    with torch.no_grad():
        hook = head.body.register_forward_hook(keep, with_kwargs=True)
        try:
            logits = model(input_ids=input_ids).logits
        finally:
            hook.remove()
        if len(calls) == 1 and calls[0][0]:
            hidden = calls[0][1]
        else:
            hidden = last_hidden_state(head.body(input_ids=input_ids))
        fused = head_logits(head, hidden)
    if fused.shape != logits.shape or not torch.allclose(
            fused.float(), logits.float(), rtol=rtol,
            atol=rtol * max(1.0, logits.float().abs().max().item())):
        diff = ((fused.float() - logits.float()).abs().max().item()
                if fused.shape == logits.shape else "shape mismatch")
        raise ValueError(f"tdpo_ext: cannot fuse the LM head of {type(model).__name__}: "
                         "the head applied to the body's hidden states differs from "
                         f"model(ids).logits (max |diff| {diff}); the model changes its "
                         "logits beyond a scaled, soft-capped linear head")


def _called_on_ids_only(args, kwargs, input_ids: Tensor) -> bool:
    """Whether a body call got input_ids and nothing else but None and flags: the call
    body(input_ids=ids) that the fused head makes, up to its defaults."""
    rest = dict(kwargs)
    ids = args[0] if args else rest.pop("input_ids", None)
    return (len(args) <= 1 and isinstance(ids, Tensor) and ids.shape == input_ids.shape
            and torch.equal(ids, input_ids)
            and all(value is None or isinstance(value, bool) for value in rest.values()))


def last_hidden_state(output) -> Tensor:
    """The last hidden state from a body's output (a ModelOutput or a tuple)."""
    hidden = getattr(output, "last_hidden_state", None)
    return output[0] if hidden is None else hidden


def _zero3_gathered(*params):
    """A context in which DeepSpeed ZeRO-3 partitioned parameters hold their whole data
    (once, however many times one is passed); those already gathered (a tied head, held by
    the input embedding's module) are left to ZeRO-3, which repartitions them itself."""
    import deepspeed  # only ZeRO-3 parameters have a ds_id
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    partitioned = {id(p): p for p in params
                   if p is not None and p.ds_status != ZeroParamStatus.AVAILABLE}
    return deepspeed.zero.GatheredParameters(list(partitioned.values()))


def _unsharded_by_fsdp(model, weight: Tensor) -> bool:
    """Whether FSDP unsharded ``weight`` for this forward call, and so may free its storage
    when the call returns: FSDP1 marks the parameters it flattened (use_orig_params) or
    hands out views of its flat parameter; FSDP2 marks nothing on the unsharded tensors it
    swaps in for the call, only the modules it wraps, of which ``model`` is or holds one
    (accelerate wraps the root and, with its transformer-based policy, the decoder layers)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._common_utils import _is_fsdp_flattened
    base = weight._base
    if _is_fsdp_flattened(weight) or (base is not None and _is_fsdp_flattened(base)):
        return True
    return any(isinstance(module, FSDPModule) for module in model.modules())


def whole_head(model) -> tuple[Tensor, Optional[Tensor]]:
    """``model``'s LM-head weight and bias, inside its forward call: whole, and valid after
    the call returns (for a loss computed then, or a backward), decided by how the
    parameters themselves are held. Each is made whole once per call, never once per tile:
    - DeepSpeed ZeRO-3 partitioned (they have a ds_id): gathered and cloned, since ZeRO-3
      partitions them again when the gather ends; the clones' gradients flow into the
      partitioned parameters.
    - DTensors (a head sharded on its own, tensor parallelism): full_tensor(), a new
      tensor whose gradient flows into the shards.
    - unsharded by FSDP for the call (_unsharded_by_fsdp): cloned, since FSDP frees their
      storage when the call returns; the gradients reach the shards through FSDP's hooks.
    - otherwise the parameters themselves."""
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if hasattr(weight, "ds_id"):
        with _zero3_gathered(weight, bias):
            return weight.clone(), None if bias is None else bias.clone()
    if isinstance(weight, DTensor):
        return weight.full_tensor(), None if bias is None else bias.full_tensor()
    if _unsharded_by_fsdp(model, weight):
        return weight.clone(), None if bias is None else bias.clone()
    return weight, bias


def add_fused_head(model, body: torch.nn.Module) -> None:
    """Lets ``model(..., fused_head=fn)`` run ``body`` (lm_head_of's) and return ``fn(hidden,
    weight, bias)``: its last hidden states and its LM head's weight and bias, as the head
    would read them (whole if sharded, in autocast's dtype under autocast). The loss is
    then computed inside the model's own forward call, which DDP and FSDP wrappers need to
    synchronize gradients and ZeRO-3 needs to reduce them. Without fused_head, the forward
    is the one before, so generation is unchanged.

    whole_head says how a sharded head is made whole."""
    previous_forward = model.forward

    # Keep the original signature: `generate` validates its model kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_head=None, labels=None, **kwargs):
        if fused_head is None:
            if labels is not None:
                kwargs["labels"] = labels
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = last_hidden_state(body(*args, **kwargs))
        weight, bias = whole_head(self)
        device_type = hidden.device.type
        dtype = (torch.get_autocast_dtype(device_type)
                 if torch.is_autocast_enabled(device_type) else weight.dtype)
        # With a device map, the body can end on another device than the head.
        hidden = hidden.to(device=weight.device, dtype=dtype)
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        return fused_head(hidden, weight, bias)

    model.forward = types.MethodType(forward, model)


def head_inputs(model, **inputs) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(hidden, weight, bias): what ``model``'s fused head reads for these inputs, through
    its own forward call (add_fused_head), for a frozen reference whose side of the fused
    loss is computed after its forward call returns (whole_head keeps them valid)."""
    read = []

    def keep(hidden, weight, bias):
        read.append((hidden, weight, bias))
        return ()  # what the forward call returns: nothing beyond what is kept

    model(**inputs, fused_head=keep)
    return read[0]
