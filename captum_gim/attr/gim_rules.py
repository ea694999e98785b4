"""``gim_rules``: the three GIM rules installed on one model for one block."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn
from typing_extensions import Unpack

from captum_gim.config import GIMConfig, GIMSettings
from captum_gim.sites.audit.backward import watch_backward
from captum_gim.sites.audit.forward import cached_audit, run_audit, store_audit
from captum_gim.sites.cache import cached_rule_sites
from captum_gim.sites.checks import check_model
from captum_gim.sites.compiled import eager_calls
from captum_gim.sites.discovery import RuleSites, report_problems
from captum_gim.sites.exclusive import exclusive
from captum_gim.sites.install import install_rules


@contextlib.contextmanager
def gim_rules(
    model: nn.Module,
    *,
    config: GIMConfig | None = None,
    strict: bool = True,
    example_inputs: Any = None,
    **settings: Unpack[GIMSettings],
) -> Iterator[GIMConfig]:
    r"""
    Applies the GIM backward rules to every forward pass through ``model``
    inside the block, so that any gradient-based Captum method (Saliency,
    IntegratedGradients, GradientShap, LayerIntegratedGradients, ...) computes
    GIM gradients. The rules are module-level hooks on ``model`` only: other
    models, also of the same class and in other threads, keep their exact
    gradients, and ``model`` is left exactly as it was when the block ends,
    also when it ends with an exception.

    The rules act on the autograd graph built by the forward pass: a backward
    pass after the block through a graph built inside it still uses them,
    except for layers recomputed during the backward pass by gradient
    checkpointing, so with checkpointing run the backward inside the block.

    Rules are never applied twice: entering ``gim_rules`` on a model that is
    already under the rules, or on a model that shares a module with one that
    is (e.g. ``model.model`` inside ``gim_rules(model)``), raises
    ``RuntimeError``. Threads may use ``gim_rules`` on different model objects
    at the same time, with different settings; a model object under the rules
    must not be used by another thread until the block ends (a second
    ``gim_rules`` on it raises, but a plain forward pass in another thread would
    silently get the rules).

    The rule sites are found once per model object (and again when its
    module tree, a config object or an attention implementation changes); the
    per-call checks of every rule still run on every forward pass. The forward
    pass is also audited once per model (see :func:`captum_gim.describe`):
    every softmax, normalization and product of two input-dependent tensors
    must be covered by a rule, kept exact by design, or it is refused by name.
    The audit runs on ``example_inputs`` when given (without them, a block uses
    the audit made before for this model, if any); GIMAttribution, LayerGIM
    and LLMGIMAttribution audit on their first call, with its inputs.

    A backward pass inside the block through a graph whose forward pass ran
    before it gets no rule; when the block sees such a backward reach the
    model's parameters (``loss.backward()``, nnsight's ``.backward()``) it
    raises ``RuntimeError`` (with ``strict=False``: warns) naming the fix.

    Modules compiled in place with ``module.compile()`` run eagerly inside the
    block (and are compiled again after it), so that the rule hooks see every
    forward pass. A ``torch.compile(model)`` wrapper is refused: pass the
    original module (``compiled._orig_mod``) and call it, not the wrapper, in
    the forward function. A model in training mode with active dropout gets a
    warning, as its attributions are then random.

    Args:
        model (nn.Module): The model to modify, usually a transformers model.
        config (GIMConfig, optional): All seven settings as one object, instead
                    of the keywords.
                    Default: None
        strict (bool, optional): Raise for parts of the model the rules cannot
                    reach (see :func:`captum_gim.sites.find_rule_sites`);
                    with ``False`` they are skipped with a warning. A part is
                    refused only for a rule that is switched on.
                    Default: True
        example_inputs (Any, optional): Inputs of ``model`` for the one-time
                    audit of its forward pass: a tensor, a tuple of positional
                    arguments, or a dict of keyword arguments (e.g. a
                    tokenizer's output). None: no audit in this block (one
                    made before for this model is still applied).
                    Default: None
        **settings: Any of the seven settings of :class:`GIMConfig`
                    (``temperature``, ``freeze_norm``, ``q_scale``, ``k_scale``,
                    ``v_scale``, ``gate_scale``, ``up_scale``) as keywords, with
                    GIMConfig's defaults and meaning. Not together with
                    ``config``.

    Yields:
        *GIMConfig*: the settings in force.

    Examples::

        >>> from captum.attr import IntegratedGradients
        >>> from captum_gim import gim_rules
        >>> ig = IntegratedGradients(forward_func)
        >>> with gim_rules(model):
        >>>     attributions = ig.attribute(embeddings, target=token_id)
    """
    resolved = GIMConfig.resolve(config, settings)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"gim_rules needs the nn.Module to modify, got {type(model).__name__}. "
            "Pass the model itself, e.g. gim_rules(model)."
        )
    run = None if example_inputs is None else model_runner(model, example_inputs)
    with applied_rules(model, resolved, strict, run):
        yield resolved


def model_runner(model: nn.Module, example_inputs: Any) -> Callable[[], object]:
    r"""
    Returns:
        *Callable*: runs ``model`` on ``example_inputs`` (a tensor, a tuple of
        positional arguments or a dict of keyword arguments); floating-point
        tensors are passed as aliases that require grad, so the audit follows them.
    """
    if isinstance(example_inputs, dict) or hasattr(example_inputs, "keys"):
        kwargs = {key: _as_input(value) for key, value in dict(example_inputs).items()}
        return lambda: model(**kwargs)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    args = tuple(_as_input(value) for value in args)
    return lambda: model(*args)


def _as_input(value: Any) -> Any:
    """A floating-point tensor as an input the audit follows (requiring grad)."""
    if isinstance(value, Tensor) and value.is_floating_point() and not value.requires_grad:
        return value.detach().requires_grad_()
    return value


@contextlib.contextmanager
def applied_rules(
    model: nn.Module,
    config: GIMConfig,
    strict: bool,
    run: Callable[[], object] | None,
    seeds: Sequence[nn.Module] = (),
) -> Iterator[RuleSites]:
    r"""
    The body of :func:`gim_rules`: the rules of ``config`` on ``model`` for one
    block, after its forward pass was audited with ``run`` (once per model).

    Args:
        model (nn.Module): The model.
        config (GIMConfig): The settings.
        strict (bool): Raise for parts the rules cannot reach (else warn).
        run (Callable or None): Runs one forward pass through ``model`` on real
                    inputs, for the audit; None: no audit now (one cached
                    before is still applied).
        seeds (Sequence[nn.Module], optional): Modules whose outputs the audit
                    treats as the input (LayerGIM's layers).
                    Default: ()

    Yields:
        *RuleSites*: the sites the rules are installed on.
    """
    named = list(model.named_modules())
    modules = [module for _, module in named]
    check_model(model, named)
    with contextlib.ExitStack() as stack:
        stack.enter_context(exclusive(model, modules))
        stack.enter_context(eager_calls(model, modules))
        sites = cached_rule_sites(model, named, strict=strict)
        report_problems(sites.problems, strict, config, stacklevel=5)
        if not config.any_rule_on or any(p.rule == "any" for p in sites.problems):
            yield sites  # no rule on, or none reaches the model (reported above)
            return
        sites = audited_sites(model, sites, config, strict, run, seeds)
        watch_backward(stack, model, sites, strict)
        install_rules(stack, sites, config)
        yield sites


def audited_sites(
    model: nn.Module,
    sites: RuleSites,
    config: GIMConfig,
    strict: bool,
    run: Callable[[], object] | None,
    seeds: Sequence[nn.Module] = (),
) -> RuleSites:
    r"""
    ``sites`` with the gated MLPs the audit of ``model`` recognised by their
    data flow, after reporting what it refuses for the rules ``config``
    switches on. The audit is run with ``run`` when none is cached.

    Returns:
        *RuleSites*: the sites to install.
    """
    audit = cached_audit(model, sites)
    if (audit is None or not audit.inputs_seen) and run is not None:
        audit = run_audit(model, sites, run, seeds)
        store_audit(model, sites, audit)
    if audit is None:
        return sites
    report_problems(audit.problems(), strict, config, stacklevel=6)
    if not audit.traced_gated_mlps:
        return sites
    return dataclasses.replace(sites, traced_gated_mlps=list(audit.traced_gated_mlps))
