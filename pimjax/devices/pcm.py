"""PCM weights: programming noise, conductance drift and accumulated 1/f read noise.

IBM aihwkit 1.1's ``PCMLikeNoiseModel`` (``aihwkit/inference/noise/pcm.py``, fitted on
measured PCM devices, Nandakumar et al., ICECS 2019) as a pure weight part. Conductances
are in µS; a weight maps to a differential pair ``(g+, g-)`` in ``[0, g_max]`` (see
:mod:`pimjax.devices.mapping`). For each device of the pair, with ``g_T`` its target:

* programming: ``g_P = max(g_T + s_p sigma_P(g_T) z_P, 0)`` with
  ``sigma_P = (c0 + c1 (g_T/g_max) + c2 (g_T/g_max)^2) g_max / 25``;
* drift exponent: ``nu = s_d |mu + sigma z_nu|`` with ``g_r = max(g_T/g_max, 1e-7)``,
  ``mu = clip(-0.0155 ln g_r + 0.0244, 0.049, 0.1)``,
  ``sigma = clip(-0.0125 ln g_r - 0.0059, 0.008, 0.045)``;
* drift: ``g_D = g_P ((t + t0) / t0)^(-nu)``;
* read noise: ``g = max(g_D + |g_D| s_r Q_s sqrt(ln((t + t0 + t_read) / (2 t_read))) z_R, 0)``
  with ``Q_s = min(0.0088 / max((|g_P|/g_max)^0.65, 1e-3), 0.2)``.

``reconvert=True`` (the default) reproduces how aihwkit's inference tiles chain these
steps (``BaseNoiseModel.apply_drift_noise`` via ``InferenceTileWithPeriphery.drift_weights``):
the programmed *weight* ``g+_P - g-_P`` is converted to a fresh pair (its larger magnitude
back at ``g_max``, the other device at 0) and that pair drifts and gets read noise, with
the exponents drawn from the original targets. ``reconvert=False`` drifts and reads each
programmed device of the original pair on its own.

Chip state (:meth:`PCM.sample`): six standard normals per weight (programming, drift
exponent and read noise, for ``g+`` and ``g-``), depending only on the key and the shapes;
the weight-dependent sigmas are computed in :meth:`PCM.apply`, so the same chip serves a
training step (new weights) and an evaluation. One chip has one read-noise draw for all
``t`` (a coherent trajectory; aihwkit draws it anew per ``drift_analog_weights`` call, the
same distribution at each ``t``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pimjax import draws
from pimjax.devices.faults import StuckAt
from pimjax.devices.mapping import broadcast_scale, from_pair, mapping_scale, to_pair

G_MAX = 25.0  # µS, aihwkit SinglePairConductanceConverter default
PROG_COEFF = (0.26348, 1.9650, -1.1731)  # µS, fitted at g_max = 25 µS (PCMLikeNoiseModel)
PROG_COEFF_G_MAX_REFERENCE = 25.0
T0 = 20.0  # s, first read after programming (drift fit)
T_READ = 250e-9  # s, read duration of the 1/f fit
G_REL_FLOOR = 1e-7  # _ZERO_CLIP of aihwkit/inference/noise/pcm.py
STREAMS = ("prog_plus", "prog_minus", "nu_plus", "nu_minus", "read_plus", "read_minus")
_STUCK_STREAM = len(STREAMS)


def _clip_min0(x):
    """max(x, 0) forward; identity gradient (a clamp of noise, not of the signal)."""
    return x + jax.lax.stop_gradient(jnp.maximum(x, 0.0) - x)


@dataclasses.dataclass(frozen=True)
class PCM:
    """aihwkit 1.1's PCM-like inference noise model as a chip weight part."""

    g_max: float = G_MAX
    per_column: bool = False  # mapping scale per output column (else per layer)
    prog_coeff: tuple[float, ...] = PROG_COEFF
    prog_coeff_g_max_reference: float = PROG_COEFF_G_MAX_REFERENCE
    t0: float = T0
    t_read: float = T_READ
    prog_noise_scale: float = 1.0
    drift_scale: float = 1.0
    read_noise_scale: float = 1.0
    reconvert: bool = True
    stuck: StuckAt | None = None

    def __post_init__(self):
        if isinstance(self.prog_coeff, list):
            object.__setattr__(self, "prog_coeff", tuple(self.prog_coeff))
        if not isinstance(self.prog_coeff, tuple) or not self.prog_coeff or not all(
            isinstance(c, (int, float)) and math.isfinite(c) for c in self.prog_coeff
        ):
            raise ValueError(f"prog_coeff={self.prog_coeff!r} must be a tuple of numbers")
        for field in ("g_max", "prog_coeff_g_max_reference", "t0", "t_read"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or \
                    not math.isfinite(v):
                raise ValueError(f"{field}={v!r} must be a finite number > 0")
        for field in ("prog_noise_scale", "drift_scale", "read_noise_scale"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or \
                    not math.isfinite(v):
                raise ValueError(f"{field}={v!r} must be a finite number >= 0 (1 = aihwkit's)")
        if self.stuck is not None and not isinstance(self.stuck, StuckAt):
            raise ValueError(f"stuck={self.stuck!r} must be a faults.StuckAt or None")

    # ------------------------------------------------------------ conductance formulas

    def prog_sigma(self, g_target):
        """Programming-noise std (µS) of a device programmed to ``g_target`` (µS)."""
        g_rel = g_target / self.g_max
        sigma, power = self.prog_coeff[0], 1.0
        for c in self.prog_coeff[1:]:
            power = power * g_rel
            sigma = sigma + c * power
        return sigma * self.g_max / self.prog_coeff_g_max_reference

    def program(self, g_target, z):
        """Programmed conductance ``max(g_T + sigma_P(g_T) z, 0)`` for standard normals ``z``."""
        sigma = jax.lax.stop_gradient(self.prog_sigma(g_target))
        return _clip_min0(g_target + self.prog_noise_scale * sigma * z)

    def drift_exponent(self, g_target, z):
        """Drift exponent ``nu = |mu(g_T) + sigma(g_T) z|`` (times ``drift_scale``)."""
        g_rel = jnp.maximum(jnp.abs(jax.lax.stop_gradient(g_target)) / self.g_max, G_REL_FLOOR)
        log_g = jnp.log(g_rel)
        mu = jnp.clip(-0.0155 * log_g + 0.0244, 0.049, 0.1)
        sigma = jnp.clip(-0.0125 * log_g - 0.0059, 0.008, 0.045)
        return jnp.abs(mu + sigma * z) * self.drift_scale

    def drift(self, g_prog, nu, t):
        """Drifted conductance ``g_P ((t + t0) / t0)^(-nu)`` at ``t`` seconds after programming."""
        return g_prog * ((t + self.t0) / self.t0) ** (-nu)

    def read_sigma(self, g_prog, t):
        """Relative std of the accumulated 1/f read noise at ``t``: ``Q_s sqrt(ln(...))``."""
        g = jnp.abs(jax.lax.stop_gradient(g_prog)) / self.g_max
        q_s = jnp.minimum(0.0088 / jnp.maximum(g**0.65, 1e-3), 0.2)
        tt = t + self.t0
        return q_s * jnp.sqrt(jnp.log((tt + self.t_read) / (2.0 * self.t_read)))

    def read(self, g_drift, g_prog, z, t):
        """Read conductance ``max(g_D + |g_D| sigma_R(g_P, t) z, 0)``."""
        sigma = self.read_noise_scale * self.read_sigma(g_prog, t)
        return _clip_min0(g_drift + jnp.abs(g_drift) * sigma * z)

    # --------------------------------------------------------------------- weight part

    def sample(self, key, template):
        """Chip state: the standard normals of :data:`STREAMS` for every layer of ``template``.

        Layer ``i`` (pytree-flatten order) uses ``fold_in(key, i)``, stream ``s`` of it
        ``fold_in(layer_key, s)``; with ``stuck`` set, also the fault uniforms (``"stuck"``).
        """
        leaves, treedef = jax.tree_util.tree_flatten(template)
        if not leaves:
            raise ValueError("template has no arrays: pass the model's analog kernels")
        layer_keys = draws.fold_ins(key, len(leaves))
        keys = [k for lk in layer_keys for k in draws.fold_ins(lk, len(STREAMS))]
        shapes = [tuple(jnp.shape(leaf)) for leaf in leaves for _ in STREAMS]
        zs = iter(draws.normals(keys, shapes))  # one hash per distinct layer shape
        out = []
        for k, leaf in zip(layer_keys, leaves, strict=True):
            state = {name: next(zs) for name in STREAMS}
            if self.stuck is not None:
                state["stuck"] = self.stuck.sample(draws.fold_in(k, _STUCK_STREAM), leaf)
            out.append(state)
        return jax.tree_util.tree_unflatten(treedef, out)

    def stages(self, w, state, t):
        """Every stage of one kernel's pairs at read time ``t`` (one chip, no batch axis).

        Returns a dict of µS arrays shaped like ``w``, one per device (``_plus``/``_minus``):
        ``g_target``, ``g_prog``, ``nu``, ``g_drift``, ``g_read`` (the pair that drifts:
        the re-converted one when ``reconvert``), ``g_final`` (read noise and faults applied),
        plus ``scale`` (the mapping scale) and ``factor`` (µS of the final pair per µS of
        the original mapping: max|g+_P - g-_P| / g_max when ``reconvert``, else 1).
        """
        w = jnp.asarray(w)
        t = jnp.asarray(t, jnp.float32)
        scale = mapping_scale(w, self.per_column)
        up, um = to_pair(w / broadcast_scale(scale, w))
        out = {"scale": scale}
        gt = {"plus": self.g_max * up, "minus": self.g_max * um}
        gp = {s: self.program(gt[s], state[f"prog_{s}"]) for s in gt}
        nu = {s: self.drift_exponent(gt[s], state[f"nu_{s}"]) for s in gt}
        if self.reconvert:
            # aihwkit converts the programmed weight back to a pair (scale from its abs max)
            d = gp["plus"] - gp["minus"]
            r = jax.lax.stop_gradient(jnp.max(jnp.abs(d)))
            r = jnp.where(r > 0, r, self.g_max)
            rp, rm = to_pair(d / r)
            gr = {"plus": self.g_max * rp, "minus": self.g_max * rm}
            factor = r / self.g_max
        else:
            gr, factor = gp, jnp.ones((), jnp.float32)
        gd = {s: self.drift(gr[s], nu[s], t) for s in gt}
        gf = {s: self.read(gd[s], gr[s], state[f"read_{s}"], t) for s in gt}
        if self.stuck is not None:
            # faults act on the devices in the original mapping's units (g_max = |w| = scale)
            fp, fm = self.stuck.stick(gf["plus"] * factor / self.g_max,
                                      gf["minus"] * factor / self.g_max, state["stuck"])
            gf = {"plus": fp * self.g_max / factor, "minus": fm * self.g_max / factor}
        for name, val in (("g_target", gt), ("g_prog", gp), ("nu", nu), ("g_read", gr),
                          ("g_drift", gd), ("g_final", gf)):
            for s in gt:
                out[f"{name}_{s}"] = val[s]
        out["factor"] = factor
        return out

    def apply(self, w, state, t):
        """The weight the crossbar holds at ``t`` seconds after programming.

        ``w [*kernel]`` with ``t`` of shape ``()``, or a chip batch ``w [C, *kernel]`` with
        ``t`` of shape ``(C,)`` and state leaves ``[C, *kernel]``. The gradient wrt ``w``
        follows the conductances (drift factors included); noise sigmas, the mapping scale
        and the clamps at 0 are straight-through.
        """
        t = jnp.asarray(t, jnp.float32)
        if t.ndim == 1:
            return jax.vmap(self.apply)(w, state, t)
        if t.ndim != 0:
            raise ValueError(f"t has shape {t.shape}: use () for one chip or (C,) for a batch")
        s = self.stages(w, state, t)
        u = from_pair(s["g_final_plus"], s["g_final_minus"]) * s["factor"] / self.g_max
        return u * broadcast_scale(s["scale"], w)
