"""The classic optimizers, each a :func:`~optstate.chain` of building blocks.

Each alias has Optax's signature, defaults and numerics, and the same chain layout (so the
state of ``optstate.adam`` is laid out like that of ``optax.adam``). Each checks the
hyperparameters it is given (:mod:`optstate._core.checks`): a Python or NumPy number out of
its range, NaN, an infinity, a string or a non-scalar array raises an error that names the
alias, the argument and the value; arrays (e.g. from :func:`optstate.inject_hyperparams`)
are checked for shape and dtype only. Each docstring ends with
a one-step example on a two-element parameter, run as a doctest by ``tests/test_doctests.py``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from optstate._core.base import GradientTransformation, chain, identity
from optstate._core.checks import (
    called_as,
    check_dtype,
    check_int,
    check_learning_rate,
    check_scalar,
)
from optstate._core.types import MaskOrFn, ScalarOrSchedule
from optstate.transforms.adadelta import scale_by_adadelta
from optstate.transforms.adam import scale_by_adam
from optstate.transforms.clipping import clip_by_block_rms
from optstate.transforms.factored import scale_by_factored_rms, scale_by_param_block_rms
from optstate.transforms.lion import scale_by_lion
from optstate.transforms.momentum import ema, trace
from optstate.transforms.rms import scale_by_rms, scale_by_rss, scale_by_stddev
from optstate.transforms.scale import scale, scale_by_learning_rate
from optstate.transforms.trust_ratio import scale_by_trust_ratio
from optstate.transforms.weight_decay import add_decayed_weights


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
) -> GradientTransformation:
    r"""Stochastic gradient descent, optionally with (Nesterov) momentum.

    .. math::
        m_t = g_t + \mu\, m_{t-1}, \qquad
        p_t = p_{t-1} - \eta_t\, m_t \quad(\text{Nesterov: } p_t = p_{t-1} - \eta_t (g_t +
        \mu\, m_t)),

    and :math:`p_t = p_{t-1} - \eta_t g_t` without momentum.

    Args:
      learning_rate: :math:`\eta`, a float or a schedule of the step count.
      momentum: :math:`\mu`; ``None`` for plain SGD (no state).
      nesterov: Nesterov's accelerated gradient.
      accumulator_dtype: storage dtype of the momentum buffer.

    Returns:
      ``chain(trace or identity, scale_by_learning_rate)``.

    References:
      Robbins & Monro, "A Stochastic Approximation Method", 1951.
      Sutskever, Martens, Dahl & Hinton, "On the importance of initialization and momentum
      in deep learning", ICML 2013.

    Example:
      >>> import jax.numpy as jnp
      >>> import optstate
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> tx = optstate.sgd(learning_rate=0.1, momentum=0.9)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -0.5])}, state, params)
      >>> new_params = optstate.apply_updates(params, updates)
      >>> [round(float(x), 4) for x in new_params["w"]]
      [0.95, -1.95]
    """
    check_learning_rate(learning_rate, "sgd")
    check_scalar("momentum", momentum, context="sgd", low=-1.0, high=1.0, allow_none=True,
                 hint="momentum is the momentum coefficient (0.9 is usual).")
    check_dtype("accumulator_dtype", accumulator_dtype, "sgd")  # also without momentum
    with called_as("sgd"):
        first = (
            trace(decay=momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype)
            if momentum is not None
            else identity()
        )
        return chain(first, scale_by_learning_rate(learning_rate))


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any = None,
) -> GradientTransformation:
    r"""Adam.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2)
        |g_t|^2, \quad
        p_t = p_{t-1} - \eta_t \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t) +
        \epsilon_{\text{root}}} + \epsilon}.

    Args:
      learning_rate: :math:`\eta`, a float or a schedule.
      b1, b2, eps, eps_root, mu_dtype, nesterov, nu_dtype: see :func:`scale_by_adam`.

    Returns:
      ``chain(scale_by_adam, scale_by_learning_rate)``.

    Reference: Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.

    Example:
      The first step moves every coordinate by the learning rate (the bias-corrected
      moments give :math:`\hat m / \sqrt{\hat v} = \operatorname{sign}(g)`):

      >>> import jax.numpy as jnp
      >>> import optstate
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> tx = optstate.adam(learning_rate=0.1)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -0.5])}, state, params)
      >>> new_params = optstate.apply_updates(params, updates)
      >>> [round(float(x), 4) for x in new_params["w"]]
      [0.9, -1.9]
    """
    check_learning_rate(learning_rate, "adam")
    with called_as("adam"):
        return chain(
            scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
                          nu_dtype=nu_dtype, nesterov=nesterov),
            scale_by_learning_rate(learning_rate),
        )


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: MaskOrFn = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any = None,
) -> GradientTransformation:
    r"""AdamW: Adam with decoupled weight decay.

    .. math:: p_t = p_{t-1} - \eta_t \left( \frac{\hat m_t}{\sqrt{\hat v_t +
        \epsilon_{\text{root}}} + \epsilon} + \lambda\, p_{t-1} \right)

    with :math:`\hat m_t, \hat v_t` Adam's bias-corrected moments. The decay uses the
    parameters from before the step and is scaled by the learning rate (as Optax and
    PyTorch do).

    Args:
      learning_rate: :math:`\eta`, a float or a schedule.
      b1, b2, eps, eps_root, mu_dtype, nesterov, nu_dtype: see :func:`scale_by_adam`.
      weight_decay: :math:`\lambda`, a float or a schedule.
      mask: which parameters to decay (see :func:`add_decayed_weights`).

    Returns:
      ``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)``.

    Reference: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.

    Example:
      One step: :math:`p - 0.1\,(\operatorname{sign}(g) + 0.01\,p)`:

      >>> import jax.numpy as jnp
      >>> import optstate
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> tx = optstate.adamw(learning_rate=0.1, weight_decay=0.01)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -0.5])}, state, params)
      >>> new_params = optstate.apply_updates(params, updates)
      >>> [round(float(x), 4) for x in new_params["w"]]
      [0.899, -1.898]
    """
    check_learning_rate(learning_rate, "adamw")
    with called_as("adamw"):
        return chain(
            scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
                          nu_dtype=nu_dtype, nesterov=nesterov),
            add_decayed_weights(weight_decay, mask),
            scale_by_learning_rate(learning_rate),
        )


def adam_l2(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: MaskOrFn = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any = None,
) -> GradientTransformation:
    r"""Adam with an L2 penalty folded into the gradient (the coupled variant).

    .. math::
        \tilde g_t = g_t + \lambda\, p_{t-1}, \qquad
        p_t = p_{t-1} - \eta_t\, \operatorname{Adam}(\tilde g_1, \dots, \tilde g_t)

    The penalty passes through Adam's moments, so it is rescaled per coordinate; this is
    what Loshchilov & Hutter show to regularise less than decoupled decay (:func:`adamw`).
    Kept for comparison.

    Args:
      learning_rate: :math:`\eta`, a float or a schedule.
      b1, b2, eps, eps_root, mu_dtype, nesterov, nu_dtype: see :func:`scale_by_adam`.
      weight_decay: :math:`\lambda`, a float or a schedule.
      mask: which parameters to penalise (see :func:`add_decayed_weights`).

    Returns:
      ``chain(add_decayed_weights, scale_by_adam, scale_by_learning_rate)``.

    Reference: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
    Algorithm 2 (the "L2 regularization" lines).

    Example:
      The penalty :math:`0.1 \cdot 1.0` outweighs the gradient :math:`-0.05` of the first
      coordinate, which therefore decreases (plain Adam would raise it to 1.1):

      >>> import jax.numpy as jnp
      >>> import optstate
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> tx = optstate.adam_l2(learning_rate=0.1, weight_decay=0.1)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([-0.05, -0.5])}, state, params)
      >>> new_params = optstate.apply_updates(params, updates)
      >>> [round(float(x), 4) for x in new_params["w"]]
      [0.9, -1.9]
    """
    check_learning_rate(learning_rate, "adam_l2")
    with called_as("adam_l2"):
        return chain(
            add_decayed_weights(weight_decay, mask),
            scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
                          nu_dtype=nu_dtype, nesterov=nesterov),
            scale_by_learning_rate(learning_rate),
        )


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
) -> GradientTransformation:
    r"""RMSProp, optionally centred and with momentum.

    .. math::
        v_t = \rho v_{t-1} + (1-\rho) |g_t|^2, \qquad
        s_t = \frac{g_t}{\sqrt{v_t - [|\bar g_t|^2] + \epsilon}}, \qquad
        m_t = \mu\, m_{t-1} + \eta_t s_t, \qquad p_t = p_{t-1} - m_t

    where the bracketed :math:`\bar g_t = \rho \bar g_{t-1} + (1-\rho) g_t` is subtracted
    only when ``centered``, and without momentum :math:`p_t = p_{t-1} - \eta_t s_t`.

    Args:
      learning_rate: :math:`\eta`, a float or a schedule.
      decay: :math:`\rho`.
      eps: :math:`\epsilon`.
      initial_scale: initial :math:`v`.
      eps_in_sqrt: :math:`\epsilon` inside (default) or outside the square root.
      centered: divide by the centred (variance) estimate.
      momentum: :math:`\mu`; ``None`` for none.
      nesterov: Nesterov momentum.
      bias_correction: bias-correct the averages.

    Returns:
      ``chain(scale_by_rms or scale_by_stddev, scale_by_learning_rate, trace or identity)``.

    References:
      Tieleman & Hinton, "Lecture 6.5 - RMSProp", COURSERA: Neural Networks for Machine
      Learning, 2012.
      Graves, "Generating Sequences With Recurrent Neural Networks", arXiv:1308.0850, 2013.

    Example:
      >>> import jax.numpy as jnp
      >>> import optstate
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> tx = optstate.rmsprop(learning_rate=0.1)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -0.5])}, state, params)
      >>> new_params = optstate.apply_updates(params, updates)
      >>> [round(float(x), 4) for x in new_params["w"]]
      [0.6838, -1.6838]
    """
    check_learning_rate(learning_rate, "rmsprop")
    check_scalar("momentum", momentum, context="rmsprop", low=-1.0, high=1.0, allow_none=True,
                 hint="momentum is the momentum coefficient (e.g. 0.9), or None for none.")
    rescale = scale_by_stddev if centered else scale_by_rms
    with called_as("rmsprop"):
        return chain(
            rescale(decay=decay, eps=eps, initial_scale=initial_scale, eps_in_sqrt=eps_in_sqrt,
                    bias_correction=bias_correction),
            scale_by_learning_rate(learning_rate),
            trace(decay=momentum, nesterov=nesterov) if momentum is not None else identity(),
        )


def adagrad(
    learning_rate: ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
) -> GradientTransformation:
    r"""Adagrad.

    .. math:: s_t = s_{t-1} + |g_t|^2, \qquad p_t = p_{t-1} - \eta_t\, g_t / \sqrt{s_t + \epsilon}

    Args:
      learning_rate: :math:`\eta`, a float or a schedule.
      initial_accumulator_value: :math:`s_0`.
      eps: :math:`\epsilon`.

    Returns:
      ``chain(scale_by_rss, scale_by_learning_rate)``.

    Reference: Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 12, 2011.

    Example:
      >>> import jax.numpy as jnp
      >>> import optstate
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> tx = optstate.adagrad(learning_rate=0.1)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -0.5])}, state, params)
      >>> new_params = optstate.apply_updates(params, updates)
      >>> [round(float(x), 4) for x in new_params["w"]]
      [0.9155, -1.9155]
    """
    check_learning_rate(learning_rate, "adagrad")
    with called_as("adagrad"):
        return chain(
            scale_by_rss(initial_accumulator_value=initial_accumulator_value, eps=eps),
            scale_by_learning_rate(learning_rate),
        )


def adadelta(
    learning_rate: ScalarOrSchedule | None = None,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: ScalarOrSchedule = 0.0,
    weight_decay_mask: MaskOrFn = None,
) -> GradientTransformation:
    r"""Adadelta, with optional weight decay added to the gradient first.

    .. math::
        \tilde g_t = g_t + \lambda p_{t-1}, \quad
        \Delta_t = \frac{\sqrt{E[\Delta^2]_{t-1} + \epsilon}}{\sqrt{E[\tilde g^2]_t +
        \epsilon}} \tilde g_t, \quad p_t = p_{t-1} - \eta_t \Delta_t

    Args:
      learning_rate: :math:`\eta`, a float or a schedule; ``None`` means 1 but *no sign
        flip* (as in Optax, the bare direction is returned).
      rho: :math:`\rho`, the decay of both averages.
      eps: :math:`\epsilon`.
      weight_decay: :math:`\lambda`.
      weight_decay_mask: which parameters to decay.

    Returns:
      ``chain(add_decayed_weights, scale_by_adadelta, scale_by_learning_rate)``.

    Reference: Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701, 2012.

    Example:
      >>> import jax.numpy as jnp
      >>> import optstate
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> tx = optstate.adadelta(learning_rate=1.0)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -0.5])}, state, params)
      >>> new_params = optstate.apply_updates(params, updates)
      >>> [round(float(x), 4) for x in new_params["w"]]
      [0.9968, -1.9968]
    """
    check_learning_rate(learning_rate, "adadelta", allow_none=True)
    with called_as("adadelta"):
        return chain(
            add_decayed_weights(weight_decay, mask=weight_decay_mask),
            scale_by_adadelta(rho=rho, eps=eps),
            scale_by_learning_rate(learning_rate),
        )


def lamb(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
) -> GradientTransformation:
    r"""LAMB: Adam with decoupled weight decay and a layer-wise trust ratio.

    .. math::
        r_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{\text{root}}} + \epsilon} +
        \lambda p_{t-1}, \qquad
        p_t = p_{t-1} - \eta_t \frac{\|p_{t-1}\|}{\|r_t\|} r_t \quad\text{(per leaf)}

    Args:
      learning_rate: :math:`\eta`, a float or a schedule.
      b1, b2, eps, eps_root: see :func:`scale_by_adam`.
      weight_decay: :math:`\lambda`.
      mask: which parameters to decay.

    Returns:
      ``chain(scale_by_adam, add_decayed_weights, scale_by_trust_ratio,
      scale_by_learning_rate)``.

    Reference: You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes", ICLR 2020, Algorithm 2.

    Example:
      >>> import jax.numpy as jnp
      >>> import optstate
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> tx = optstate.lamb(learning_rate=0.1)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -0.5])}, state, params)
      >>> new_params = optstate.apply_updates(params, updates)
      >>> [round(float(x), 4) for x in new_params["w"]]
      [0.8419, -1.8419]
    """
    check_learning_rate(learning_rate, "lamb")
    with called_as("lamb"):
        return chain(
            scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
            add_decayed_weights(weight_decay=weight_decay, mask=mask),
            scale_by_trust_ratio(),
            scale_by_learning_rate(learning_rate),
        )


def lion(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    weight_decay: ScalarOrSchedule = 1e-3,
    mask: MaskOrFn = None,
) -> GradientTransformation:
    r"""Lion, with decoupled weight decay.

    .. math::
        p_t = p_{t-1} - \eta_t \left(\operatorname{sign}(\beta_1 m_{t-1} + (1-\beta_1) g_t)
        + \lambda p_{t-1}\right), \qquad m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

    Args:
      learning_rate: :math:`\eta`, a float or a schedule (typically 3-10x smaller than
        AdamW's).
      b1, b2, mu_dtype: see :func:`scale_by_lion` (its ``mode`` gives the smooth and refined
        variants; like Optax's ``lion``, the alias keeps the sign).
      weight_decay: :math:`\lambda`.
      mask: which parameters to decay.

    Returns:
      ``chain(scale_by_lion, add_decayed_weights, scale_by_learning_rate)``.

    Reference: Chen et al., "Symbolic Discovery of Optimization Algorithms",
    arXiv:2302.06675, 2023.

    Example:
      >>> import jax.numpy as jnp
      >>> import optstate
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> tx = optstate.lion(learning_rate=0.1)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -0.5])}, state, params)
      >>> new_params = optstate.apply_updates(params, updates)
      >>> [round(float(x), 4) for x in new_params["w"]]
      [0.8999, -1.8998]
    """
    check_learning_rate(learning_rate, "lion")
    with called_as("lion"):
        return chain(
            scale_by_lion(b1=b1, b2=b2, mu_dtype=mu_dtype),
            add_decayed_weights(weight_decay, mask),
            scale_by_learning_rate(learning_rate),
        )


def adafactor(
    learning_rate: ScalarOrSchedule | None = None,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    momentum: float | None = None,
    dtype_momentum: Any = jnp.float32,
    weight_decay_rate: ScalarOrSchedule | None = None,
    eps: float = 1e-30,
    factored: bool = True,
    weight_decay_mask: MaskOrFn = None,
) -> GradientTransformation:
    r"""Adafactor.

    .. math::
        s_t = \operatorname{clip}_{d}\!\left(g_t / \sqrt{\hat V_t}\right), \qquad
        p_t = p_{t-1} - \left(\eta_t \max(\operatorname{RMS}(p_{t-1}), 10^{-3})\, s_t
        + \lambda p_{t-1}\right)

    with :math:`\hat V_t` the factored second moment of :func:`scale_by_factored_rms`,
    :math:`\operatorname{clip}_d` the per-leaf RMS clipping of :func:`clip_by_block_rms`,
    and optionally a (non-debiased) moving average of :math:`\eta_t \ldots s_t` as momentum.

    Args:
      learning_rate: :math:`\eta`, a float or a schedule; ``None`` for no scaling.
      min_dim_size_to_factor, decay_rate, factored: see :func:`scale_by_factored_rms`.
      decay_offset: the ``step_offset`` of :func:`scale_by_factored_rms`.
      multiply_by_parameter_scale: scale by the parameters' RMS (relative step size).
      clipping_threshold: :math:`d`; ``None`` disables clipping.
      momentum: the decay of an optional moving average of the updates.
      dtype_momentum: storage dtype of that average.
      weight_decay_rate: :math:`\lambda`; ``None`` for no decay.
      eps: :math:`\epsilon_1`, added to the squared gradients.
      weight_decay_mask: which parameters to decay.

    Returns:
      A :func:`chain` of the above, ending in ``scale(-1)``.

    Reference: Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost", ICML 2018.

    Example:
      >>> import jax.numpy as jnp
      >>> import optstate
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> tx = optstate.adafactor(learning_rate=0.1)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -0.5])}, state, params)
      >>> new_params = optstate.apply_updates(params, updates)
      >>> [round(float(x), 4) for x in new_params["w"]]
      [0.8419, -1.8419]
    """
    # The arguments named differently from the building blocks', checked under their own names.
    context = "adafactor"
    check_learning_rate(learning_rate, context, allow_none=True)
    check_int("decay_offset", decay_offset, context=context)
    check_scalar("clipping_threshold", clipping_threshold, context=context, low=0.0,
                 low_inclusive=False, allow_none=True,
                 hint="clipping_threshold is the largest RMS of each leaf's update (1.0 is "
                      "usual), or None for no clipping.")
    check_scalar("momentum", momentum, context=context, low=0.0, high=1.0, allow_none=True,
                 hint="momentum is the decay of an average of the updates, or None for none.")
    check_dtype("dtype_momentum", dtype_momentum, context)
    check_scalar("weight_decay_rate", weight_decay_rate, context=context, allow_none=True,
                 allow_schedule=True)
    check_scalar("eps", eps, context=context, low=0.0,
                 hint="eps is added to the squared gradients (1e-30 is usual).")
    with called_as(context):
        parts = [scale_by_factored_rms(factored, decay_rate, decay_offset,
                                       min_dim_size_to_factor, eps)]
        if clipping_threshold is not None:
            parts.append(clip_by_block_rms(clipping_threshold))
        if learning_rate is not None:
            parts.append(scale_by_learning_rate(learning_rate, flip_sign=False))
        if multiply_by_parameter_scale:
            parts.append(scale_by_param_block_rms())
        if momentum is not None:
            parts.append(ema(momentum, debias=False, accumulator_dtype=dtype_momentum))
        if weight_decay_rate is not None:
            parts.append(add_decayed_weights(weight_decay_rate, mask=weight_decay_mask))
        parts.append(scale(-1))
        return chain(*parts)
