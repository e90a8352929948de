"""Convert a user's own, unmodified Flax Linen model into an analog one: :func:`convert`.

``convert(model, input_shape)`` returns a :class:`Converted` module whose ``init``/``apply``
work wherever pimjax takes a model (training steps, :func:`pimjax.montecarlo.evaluate_chips`,
:mod:`pimjax.introspect`). Each ``nn.Dense``, ``nn.DenseGeneral`` (the q/k/v/out projections
of ``nn.MultiHeadDotProductAttention`` too), ``nn.Einsum`` with a weight and 2-D ``nn.Conv``
that a :class:`Rule` selects computes as a pimjax analog layer (:mod:`pimjax.layers`): its
input and weight quantizers, the chip's device parts and periphery (``"chip"`` collection) and the
digital self-tuning gain and offset (``"tune"`` collection). The user's parameters keep their
names and shapes (``Conv_0/kernel``, ``Dense_1/bias``) and their initializers; everything
else (batch norm, layer norm, pooling, products of two activations such as attention's
Q·Kᵀ and softmax·V) stays digital float, as the user wrote it.

Mechanism (why ``nn.intercept_methods``): while the converted model runs, a Flax method
interceptor replaces the ``__call__`` of each selected layer by the matching pimjax analog
layer (:class:`AnalogLinear`, :class:`pimjax.layers.AnalogConv`, both built on
:class:`pimjax.layers.Analog`) *bound to that layer's own scope*, so it reads and creates the
layer's own ``kernel``/``bias`` and puts its quantizer and tuning variables beside them.
Flax's ``dot_general_cls`` / ``conv_general_dilated_cls`` hooks would only swap the product,
not add the quantizer's running range, the tuning variables or a chip read at the layer's
path; Qwix's provider intercepts the same primitives and carries its own quantization state,
a second route to an analog layer. Intercepting the layer call reuses pimjax's analog layers,
so there is one route to an analog layer: :mod:`pimjax.introspect`'s hooks, chip batches
(:mod:`pimjax.perchip`) and self-tuning see a converted layer exactly as a zoo layer, and the
zoo can later be written as plain Flax and converted without changing its variables.

Rules (regular expressions, ``re.fullmatch`` on the module path joined by ``/``, first match
wins) choose the layers and set, per rule, the quantizers and analog or digital; a layer no
rule matches stays the user's float layer. A rule that matches no layer, or a selected layer
whose type or options have no analog form, raises a one-line ValueError naming the path,
from :func:`convert` (an abstract trace, before any compile).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pimjax import ops, perchip
from pimjax.layers import Analog, AnalogConv
from pimjax.perchip import Strategy
from pimjax.quant import QuantConfig

FLOAT = QuantConfig()
# Layer types with a weight that a rule may select; those without an analog form (yet) raise
# a ValueError naming the layer when a rule selects them.
LINEAR_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum, nn.ConvTranspose, nn.ConvLocal)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Which layers (``pattern``, fullmatched on the '/'-joined module path) compute how.

    ``quant``: the layer's quantizers (None: :func:`convert`'s ``quant``); ``analog``: on the
    chip (True) or digital (quantized, never reads a chip, no tuning); ``input_signed``: the
    input quantizer's range. Signed (the default) suits any input: with the running-range
    clip it spans ``[running min, running max]``, which for a ReLU's output is ``[0, max]``
    as the unsigned range; an unsigned quantizer would zero the negative inputs of, e.g.,
    attention projections after a LayerNorm. Set False for ReLU inputs with PACT/LSQ clips.
    """

    pattern: str
    quant: QuantConfig | None = None
    analog: bool = True
    input_signed: bool = True

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"rule pattern {self.pattern!r} is not a regular expression: {e}") \
                from None
        if self.quant is not None and not isinstance(self.quant, QuantConfig):
            raise ValueError(f"rule {self.pattern!r}: quant must be a pimjax.quant.QuantConfig, "
                             f"got {type(self.quant).__name__}")


def _path(module) -> str:
    return "/".join(module.scope.path)


def match(rules: Sequence[Rule], path: str) -> Rule | None:
    """The first rule whose pattern fullmatches the module ``path``, or None."""
    return next((r for r in rules if re.fullmatch(r.pattern, path)), None)


def _pairs(value, n: int, what: str, path: str):
    """``value`` (an int or a sequence of n ints) as a tuple of n ints."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{path}: nn.Conv {what}={value} has no 2-D analog form")
    return value


def _conv_padding(padding, path: str):
    """Flax's padding as AnalogConv takes it: 'SAME'/'VALID' or ((lo, hi), (lo, hi))."""
    if isinstance(padding, str):
        if padding.upper() in ("SAME", "VALID"):
            return padding.upper()
        raise ValueError(f"{path}: nn.Conv padding={padding!r} cannot be converted: use 'SAME', "
                         "'VALID' or explicit pads")
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    pads = tuple(padding)
    if len(pads) != 2:
        raise ValueError(f"{path}: nn.Conv padding={padding!r} has no 2-D analog form")
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in pads)


def _dense_axes(module, ndim: int, path: str) -> int:
    """How many trailing input axes a Dense/DenseGeneral contracts (ValueError if not the
    trailing axes in order, or if it has batch dims)."""
    if isinstance(module, nn.Dense):
        return 1
    if module.batch_dims:
        raise ValueError(f"{path}: nn.DenseGeneral with batch_dims={module.batch_dims} cannot "
                         "be converted: a crossbar has no batch axes")
    axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
    axes = tuple(a % ndim for a in axes)
    if axes != tuple(range(ndim - len(axes), ndim)):
        raise ValueError(f"{path}: nn.DenseGeneral with axis={module.axis} cannot be converted: "
                         "only trailing axes in order contract on a crossbar")
    return len(axes)


def _features(module) -> tuple[int, ...]:
    f = module.features
    return (f,) if isinstance(f, int) else tuple(f)


def _kernel_size(module) -> tuple[int, ...]:
    """An ``nn.Conv``'s kernel size as a tuple (Flax takes an int for 1-D)."""
    size = module.kernel_size
    return (size,) if isinstance(size, int) else tuple(size)


def _einsum_axes(equation: str | None, path: str) -> int:
    """How many kernel axes an ``nn.Einsum`` contracts, if its equation is a crossbar product
    ``[..., *batch, *c] x [*c, *f] -> [..., *batch, *f]`` (ValueError otherwise)."""
    if equation is None:
        raise ValueError(f"{path}: nn.Einsum without an einsum_str cannot be converted")
    eq = equation.replace(" ", "")
    bad = ValueError(f"{path}: nn.Einsum {equation!r} cannot be converted: only "
                     "'...ck,kf->...cf'-like products (the input's trailing axes contracted "
                     "with the kernel's leading ones, the kernel's others last in the output) "
                     "map onto a crossbar")
    if eq.count("->") != 1 or eq.count(",") != 1:
        raise bad
    operands, out = eq.split("->")
    lhs, rhs = operands.split(",")
    dots = lhs.startswith("...")
    if "." in rhs or dots != out.startswith("...") or "." in lhs[3 * dots:] \
            or "." in out[3 * dots:]:
        raise bad
    lhs, out = lhs[3 * dots:], out[3 * dots:]
    c = "".join(a for a in rhs if a not in out)
    f = rhs[len(c):]
    if not c or rhs != c + f or not lhs.endswith(c) or not out.endswith(f) \
            or lhs[:len(lhs) - len(c)] != out[:len(out) - len(f)] \
            or len(set(lhs + rhs)) != len(lhs) + len(f) or set(lhs[:len(lhs) - len(c)]) & set(f):
        raise bad
    return len(c)


def _einsum_str(module, args, kwargs) -> str | None:
    """The equation an ``nn.Einsum`` call uses (the call's, else the module's)."""
    if len(args) > 1:
        return args[1]
    return kwargs.get("einsum_str", getattr(module, "einsum_str", None))


def _check_convertible(module, path: str, ndim: int, equation: str | None = None) -> None:
    """Raise a one-line ValueError unless ``module`` (called on ``ndim``-D inputs, with the
    einsum ``equation`` for an ``nn.Einsum``) has an analog form."""
    kind = type(module).__name__
    if type(module) not in (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum):
        raise ValueError(f"{path}: {kind} cannot be converted (only nn.Dense, nn.DenseGeneral, "
                         "nn.Einsum and 2-D nn.Conv): leave it out of the rules")
    if getattr(module, "dtype", None) not in (None, jnp.float32) \
            or module.param_dtype != jnp.float32:
        raise ValueError(f"{path}: {kind} with dtype={module.dtype}, param_dtype="
                         f"{module.param_dtype} cannot be converted: analog layers are float32")
    if module.precision is not None:
        raise ValueError(f"{path}: {kind} with precision={module.precision} cannot be "
                         "converted: analog layers compute at the default precision")
    if isinstance(module, nn.Einsum):
        if module.preferred_element_type is not None:
            raise ValueError(f"{path}: nn.Einsum with preferred_element_type cannot be converted")
        if len(module.shape) == 4:  # 4-D kernels are a conv's (introspect)
            raise ValueError(f"{path}: nn.Einsum with a 4-D kernel cannot be converted")
        _einsum_axes(equation, path)
        return
    if isinstance(module, (nn.Dense, nn.DenseGeneral)):
        if module.dot_general is not None or module.dot_general_cls is not None:
            raise ValueError(f"{path}: {kind} with its own dot_general cannot be converted")
        contracted = _dense_axes(module, ndim, path)
        if contracted + len(_features(module)) == 4:  # 4-D kernels are a conv's (introspect)
            raise ValueError(f"{path}: {kind} with a 4-D kernel cannot be converted: contract "
                             "or produce fewer axes")
        return
    if len(_kernel_size(module)) != 2:
        raise ValueError(f"{path}: nn.Conv with kernel_size={module.kernel_size} is not 2-D: "
                         "only 2-D convs have an analog form")
    for what in ("input_dilation", "kernel_dilation"):
        if any(d != 1 for d in _pairs(getattr(module, what) or 1, 2, what, path)):
            raise ValueError(f"{path}: nn.Conv with {what}={getattr(module, what)} cannot be "
                             "converted: analog convs are undilated")
    if module.feature_group_count != 1:
        raise ValueError(f"{path}: nn.Conv with feature_group_count="
                         f"{module.feature_group_count} cannot be converted: analog convs are "
                         "ungrouped")
    if module.conv_general_dilated is not None or module.conv_general_dilated_cls is not None:
        raise ValueError(f"{path}: nn.Conv with its own conv_general_dilated cannot be converted")
    _pairs(module.strides or 1, 2, "strides", path)
    _conv_padding(module.padding, path)


class AnalogLinear(Analog):
    """An analog ``nn.Dense``/``nn.DenseGeneral``/``nn.Einsum``: ``x [..., *in] -> [...,
    *out_shape]`` with the user's kernel ``[*in, *out_shape]``, on the crossbar as ``[K, N]``.

    ``contracted``: the trailing input axes summed over; ``rank``: the input's rank without a
    chip axis (a chip batch's later layers see one more leading axis); ``features`` is
    ``prod(out_shape)``, the crossbar's columns (and the tuning's channels).
    """

    out_shape: tuple[int, ...] = ()
    contracted: int = 1
    rank: int = 2
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    has_bias: bool = True
    flat_init: bool = True  # init draws [K, N] as nn.DenseGeneral (False: the shape, nn.Einsum)

    @nn.compact
    def __call__(self, x, train: bool = False):
        k_shape = (*x.shape[x.ndim - self.contracted:], *self.out_shape)
        rows, cols = math.prod(k_shape[:self.contracted]), self.features
        kernel = self.param("kernel", self._init(self.kernel_init, (rows, cols)), k_shape)
        lead = x.shape[:x.ndim - self.contracted]
        x = self._quantize_input(x.reshape((*lead, rows)), train)
        kernel = kernel.reshape(rows, cols)
        chip = self._chip(kernel)
        chip_axis = x.ndim - 1 + self.contracted == self.rank + 1
        if chip is not None and chip.num_chips is not None:
            # a chip batch: [N, K] shared by the chips or [C, N, K], as pimjax.perchip takes it
            x = x.reshape((x.shape[0], -1, rows) if chip_axis else (-1, rows))
        y = self._mvm(x, kernel, ops.dense, lambda x, w: perchip.dense(x, w, self.perchip))
        y = self._tune_and_bias(y, train)
        if chip is not None and chip.num_chips is not None and not chip_axis:
            lead = (chip.num_chips, *lead)
        y = y.reshape((*lead, *self.out_shape))
        if self.has_bias:
            bias = self.param("bias", self._init(self.bias_init, (cols,)), self.out_shape)
            y = y + bias
        return y

    def _init(self, init, flat):
        """The user's initializer as the user's layer calls it (on ``flat`` or the shape)."""
        if not self.flat_init:
            return lambda key, shape: init(key, shape, jnp.float32)
        return lambda key, shape: init(key, flat, jnp.float32).reshape(shape)


def analog_layer(module, rule: Rule, quant: QuantConfig, ndim: int,
                 perchip: Strategy | None = None, equation: str | None = None) -> nn.Module:
    """The pimjax analog layer computing the Flax ``module`` (called on ``ndim``-D inputs
    without a chip axis) under ``rule``, bound to the module's own scope (so it reads the
    module's own ``kernel``/``bias``)."""
    path = _path(module)
    _check_convertible(module, path, ndim, equation)
    common = {"quant": rule.quant or quant, "analog": rule.analog,
              "input_signed": rule.input_signed, "kernel_init": module.kernel_init,
              "perchip": perchip, "parent": module.scope}
    if isinstance(module, nn.Einsum):
        contracted = _einsum_axes(equation, path)
        out = tuple(module.shape[contracted:])
        return AnalogLinear(math.prod(out), out_shape=out, contracted=contracted, rank=ndim,
                            bias_init=module.bias_init, has_bias=module.use_bias,
                            flat_init=False, **common)
    if isinstance(module, (nn.Dense, nn.DenseGeneral)):
        out = _features(module)
        return AnalogLinear(math.prod(out), out_shape=out,
                            contracted=_dense_axes(module, ndim, path), rank=ndim,
                            bias_init=module.bias_init, has_bias=module.use_bias, **common)
    return AnalogConv(module.features, kernel_size=_kernel_size(module),
                      strides=_pairs(module.strides or 1, 2, "strides", path),
                      padding=_conv_padding(module.padding, path), use_bias=module.use_bias,
                      **common)


def _selectable(module, method_name: str) -> bool:
    return method_name == "__call__" and isinstance(module, LINEAR_TYPES)


class Converted(nn.Module):
    """A user's Flax module whose selected layers compute as analog layers (see
    :func:`convert`); its variables are the user's, plus the analog layers' own.

    ``ranks``: each layer's input rank in a forward pass without chips (from
    :func:`convert`'s trace), so that a layer can tell a chip batch's leading axis apart.
    """

    model: nn.Module
    rules: tuple[Rule, ...]
    quant: QuantConfig = FLOAT
    input_shape: tuple[int, ...] = ()
    num_classes: int | None = None
    train_arg: str | None = "train"
    perchip: Strategy | None = None
    ranks: tuple[tuple[str, int], ...] = ()

    def setup(self):
        nn.share_scope(self, self.model)  # the user's variable paths, without a prefix

    def __call__(self, x, train: bool = False, **kwargs):
        ranks = dict(self.ranks)

        def interceptor(next_fun, args, call_kwargs, context):
            module = context.module
            if not _selectable(module, context.method_name):
                return next_fun(*args, **call_kwargs)
            path = _path(module)
            rule = match(self.rules, path)
            if rule is None:
                return next_fun(*args, **call_kwargs)
            if path not in ranks:
                raise ValueError(f"{path}: this layer was not called when the model was "
                                 "converted: convert it with pimjax.analog.convert")
            layer = analog_layer(module, rule, self.quant, ranks[path], self.perchip,
                                 _einsum_str(module, args, call_kwargs))
            return layer(args[0], train=train)

        if self.train_arg is not None:
            kwargs[self.train_arg] = train
        with nn.intercept_methods(interceptor):
            return self.model(x, **kwargs)


def linear_layers(model, input_shape, train_arg: str | None = "train"
                  ) -> dict[str, tuple[nn.Module, int, str | None]]:
    """The Dense/DenseGeneral/Conv/Einsum layers a forward pass of ``model`` calls (one
    abstract trace, no compile): ``{path: (the layer, unbound; its input's rank; an
    nn.Einsum's equation)}`` in call order."""
    found = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if _selectable(module, context.method_name):
            found.setdefault(_path(module), (module.clone(parent=None), jnp.ndim(args[0]),
                                             _einsum_str(module, args, kwargs)))
        return next_fun(*args, **kwargs)

    def init(x):
        kwargs = {} if train_arg is None else {train_arg: False}
        with nn.intercept_methods(interceptor):
            return model.init(jax.random.PRNGKey(0), x, **kwargs)

    jax.eval_shape(init, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return found


def convert(model: nn.Module, input_shape: Sequence[int], rules: Sequence[Rule] | None = None,
            *, quant: QuantConfig = FLOAT, num_classes: int | None = None,
            train_arg: str | None = "train", perchip: Strategy | None = None) -> Converted:
    """``model`` (an unmodified Flax Linen module) with its Dense/DenseGeneral/Conv analog.

    ``input_shape``: one example's shape (``[H, W, C]``); ``rules``: :class:`Rule` s, first
    match wins (default: every layer analog with ``quant``); ``train_arg``: the name of the
    model's train/eval keyword (None: it has none); ``num_classes`` (optional) lets
    pimjax check labels. Raises a one-line ValueError for a rule that matches no layer or a
    selected layer with no analog form, after one abstract trace and before any compile.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a flax.linen Module, got {type(model).__name__}")
    if not isinstance(quant, QuantConfig):
        raise ValueError(f"quant must be a pimjax.quant.QuantConfig, got {type(quant).__name__}")
    rules = (Rule(".*"),) if rules is None else tuple(rules)
    for r in rules:
        if not isinstance(r, Rule):
            raise ValueError(f"rules must be pimjax.analog.Rule objects, got {type(r).__name__}")
    input_shape = tuple(int(d) for d in input_shape)
    params = inspect.signature(type(model).__call__).parameters
    if train_arg is not None and train_arg not in params \
            and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"{type(model).__name__}.__call__ takes no {train_arg!r} keyword: pass "
                         "train_arg=None (or the name of its train/eval flag)")
    layers = linear_layers(model, input_shape, train_arg)
    used = set()
    for path, (layer, ndim, equation) in layers.items():
        rule = match(rules, path)
        if rule is not None:
            used.add(rule.pattern)
            _check_convertible(layer, path, ndim, equation)
    for r in rules:
        if r.pattern not in used:
            raise ValueError(f"rule {r.pattern!r} matches no Dense/Conv layer of "
                             f"{type(model).__name__} (its layers: {', '.join(layers) or 'none'})")
    ranks = tuple((path, ndim) for path, (_, ndim, _) in layers.items())
    return Converted(model, rules, quant, input_shape, num_classes, train_arg, perchip, ranks)
