"""Backbones from timm and torchvision behind one registry.

A backbone name is ``<library>:<model>`` (``timm:resnet18``,
``torchvision:resnet18``). Weights are never downloaded silently: ``pretrained``
is empty (random init) or a local file (safetensors, or a torch state dict
loaded with ``weights_only=True``).
"""

from __future__ import annotations

import copy
import difflib
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

LIBRARIES: dict[str, Callable[..., nn.Module]] = {}
_NAMES: dict[str, Callable[[], list[str]]] = {}


class BackboneError(ValueError):
    """Unknown backbone, unusable weights file: a user error."""


def register(library: str, list_names: Callable[[], list[str]]):
    def decorator(fn):
        LIBRARIES[library] = fn
        _NAMES[library] = list_names
        return fn

    return decorator


def split_name(name: str) -> tuple[str, str]:
    library, sep, model = name.partition(":")
    if not sep or library not in LIBRARIES:
        valid = " | ".join(f"{lib}:<model>" for lib in LIBRARIES)
        raise BackboneError(f"must be {valid}, got {name!r}")
    return library, model


def check_name(name: str) -> None:
    """Raise :class:`BackboneError` listing close matches when ``name`` is not a known model."""
    library, model = split_name(name)
    names = _NAMES[library]()
    if library == "timm":
        model = model.split(".", 1)[0]  # timm's pretrained tag (resnet18.a1_in1k) names weights, not a model
    if model not in names:
        close = difflib.get_close_matches(model, names, n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(f'{library}:{c}' for c in close)}" if close else ""
        raise BackboneError(f"names no {library} model: {name!r}{hint}")


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


@register("timm", _timm_names)
def _timm(model: str, num_classes: int, in_chans: int, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register("torchvision", _torchvision_names)
def _torchvision(model: str, num_classes: int, in_chans: int, **kwargs) -> nn.Module:
    import torchvision

    net = torchvision.models.get_model(model, weights=None, num_classes=num_classes, **kwargs)
    _refuse_swallowed_kwargs(net, kwargs)
    if in_chans != 3:
        name, conv = _first_conv(net)
        _set_module(net, name, _conv_like(conv, in_channels=in_chans))
    return net


# what a torchvision builder takes out of **kwargs before the model class sees them
_BUILDER_KEYS = {"MobileNetV3": {"width_mult", "reduced_tail", "dilated"}}


def _refuse_swallowed_kwargs(net: nn.Module, kwargs: dict) -> None:
    """TypeError for model_args that a torchvision class takes into an unused ``**kwargs``
    (ConvNeXt, MobileNetV3): e.g. timm's ``drop_rate``, which would be silently ignored."""
    import inspect

    params = inspect.signature(type(net).__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return  # the class itself refuses unknown keywords
    known = {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD} | _BUILDER_KEYS.get(type(net).__name__, set())
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{type(net).__name__}.__init__() got an unexpected keyword argument {unknown[0]!r}")


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise BackboneError(f"{type(model).__name__} has no Conv2d stem to adapt")


def _set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _conv_like(conv: nn.Conv2d, **changes) -> nn.Conv2d:
    args = dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )
    args.update(changes)
    return nn.Conv2d(**args)


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """3x3 stride-1 first convolution and no stem max-pool: keeps 32x32 inputs from shrinking to 8x8."""
    name, conv = _first_conv(model)
    _set_module(model, name, _cifar_conv(conv))
    pool = _stem_pool(model)
    if pool is not None:
        _set_module(model, pool, nn.Identity())
    return model


def _cifar_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` as a 3x3 stride-1 convolution with new random weights, of its own class and settings: a
    timm StdConv2d / ScaledStdConv2d (BiT, NFNet) keeps its weight standardisation and gain."""
    new = copy.deepcopy(conv)
    new.kernel_size, new.stride, new.padding = (3, 3), (1, 1), (1, 1)  # Conv2dSame pads itself the same
    new._reversed_padding_repeated_twice = [1, 1, 1, 1]
    new.weight = nn.Parameter(conv.weight.new_empty(conv.out_channels, conv.in_channels // conv.groups, 3, 3))
    if isinstance(getattr(new, "scale", None), float):  # ScaledStdConv2d: gamma / sqrt(fan-in)
        new.scale *= (conv.weight[0].numel() / new.weight[0].numel()) ** 0.5
    new.reset_parameters()  # as nn.Conv2d(...) draws them: a plain conv gets the same weights as before
    return new


def _stem_pool(model: nn.Module) -> str | None:
    """The name of the stem's max-pool: the first MaxPool2d, if at most 3 convolutions come before it
    (a ResNet's `maxpool`, a ResNetV2's `stem.pool`, a DenseNet's `features.pool0`, GoogLeNet's
    `maxpool1`); None for stems without one (EfficientNet, RegNet, ViT)."""
    convs = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            convs += 1
        elif isinstance(m, nn.MaxPool2d):
            return name if convs <= 3 else None
    return None


def load_weights(model: nn.Module, path: str) -> None:
    """Load a local weights file, skipping tensors whose shape differs (a new classifier head)."""
    file = Path(path)
    if not file.is_file():
        raise BackboneError(f"pretrained weights file not found: {path!r}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding problem is the file's
        why = "not a safetensors file nor a weights-only torch state dict; it is never unpickled" \
            if isinstance(exc, pickle.UnpicklingError) else str(exc)  # torch's own text suggests unpickling
        raise BackboneError(f"cannot read weights {path!r}: {why}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    _check_same_architecture(own, state, f"weights {path!r}", type(model).__name__)
    state = {k: _adapt_input_conv(own[k], v) for k, v in state.items()}
    model.load_state_dict({k: v for k, v in state.items() if own[k].shape == v.shape}, strict=False)


def _adapt_input_conv(own: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """An RGB stem's kernels for another number of input channels, as timm adapts pretrained weights
    (summed for grayscale), instead of a stem that starts from random weights."""
    if own.ndim == 4 and given.ndim == 4 and own.shape[1] != given.shape[1] and given.shape[1] == 3 \
            and own.shape[0] == given.shape[0] and own.shape[2:] == given.shape[2:]:
        from timm.models import adapt_input_conv

        return adapt_input_conv(own.shape[1], given)
    return given


_RESHAPED_AT_MOST = 4  # a new head (weight, bias) and a stem for other channels (conv, maybe a norm)


def _check_same_architecture(own: dict, state: dict, what: str, model: str) -> None:
    """BackboneError unless `state` has every tensor name of the model and no other, with at most
    a few (the head, the stem) of another shape: weights of another depth or width are refused."""
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or extra or len(reshaped) > _RESHAPED_AT_MOST:
        example = (f"{len(missing)} tensors missing (e.g. {missing[0]!r})" if missing else
                   f"{len(extra)} tensors it lacks (e.g. {extra[0]!r})" if extra else
                   f"{len(reshaped)} tensors of another shape (e.g. {reshaped[0]!r})")
        raise BackboneError(f"{what} are not {model}'s: {example}; give weights of the same architecture")


def create(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    stem: str = "default",
    pretrained: str = "",
    model_args: dict | None = None,
) -> nn.Module:
    """Build a backbone with a ``num_classes`` head for ``in_chans``-channel images."""
    library, model = split_name(name)
    kwargs = {k: v for k, v in (model_args or {}).items() if v is not None}  # timm style: None = default
    net = LIBRARIES[library](model, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if pretrained:
        load_weights(net, pretrained)
    if stem == "cifar":
        apply_cifar_stem(net)
    return net


def try_step(net: nn.Module, n: int, channels: int, image_size: int, classes: int, train: bool = True) -> None:
    """One zero batch of ``n`` images through ``net``, forward and (when ``train``) backward in train
    mode: raises whatever the model raises for an input it cannot take (a ViT built for 224 given
    32x32, batch norm on a batch of 1), and TypeError when it does not return logits (n, classes)."""
    net.train(train)
    with torch.set_grad_enabled(train):
        out = net(torch.zeros(n, channels, image_size, image_size))
        if not isinstance(out, torch.Tensor) or out.shape != (n, classes):
            raise TypeError(f"it returns {type(out).__name__} {tuple(getattr(out, 'shape', ()))}, "
                            f"not logits of shape {(n, classes)}")
        if train:
            out.sum().backward()


def failure_reason(exc: Exception) -> str:
    """One line on why a backbone could not be built or run: a BackboneError's own words, else the
    library's exception type and message."""
    reason = " ".join(str(exc).split())
    return reason if isinstance(exc, BackboneError) else f"{type(exc).__name__}: {reason}"
