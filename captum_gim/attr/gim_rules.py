"""``gim_rules``: the three GIM rules installed on one model for one block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from typing_extensions import Unpack

from captum_gim.config import GIMConfig, GIMSettings
from captum_gim.sites.cache import cached_rule_sites
from captum_gim.sites.checks import check_model
from captum_gim.sites.compiled import eager_calls
from captum_gim.sites.exclusive import exclusive
from captum_gim.sites.install import install_rules


@contextlib.contextmanager
def gim_rules(
    model: nn.Module,
    *,
    config: GIMConfig | None = None,
    strict: bool = True,
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
    per-call checks of every rule still run on every forward pass.

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
                    with ``False`` they are skipped with a warning.
                    Default: True
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
    named = list(model.named_modules())
    modules = [module for _, module in named]
    check_model(model, named)
    with contextlib.ExitStack() as stack:
        stack.enter_context(exclusive(model, modules))
        stack.enter_context(eager_calls(model, modules))
        sites = cached_rule_sites(model, named, strict=strict)
        install_rules(stack, sites, resolved)
        yield resolved
