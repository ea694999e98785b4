"""``describe``: what GIM does to a model, part by part, before you trust a result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from captum_gim.attr.gim_rules import model_runner
from captum_gim.config import GIMConfig
from captum_gim.sites.attention.routed import attention_implementation
from captum_gim.sites.audit.forward import Audit, run_audit, store_audit
from captum_gim.sites.cache import cached_rule_sites
from captum_gim.sites.discovery import GatedLayout, GatedMLPSite, NormSite, RuleSites, rule_is_on
from captum_gim.sites.norms.recognition import NormForm

#: The three kinds of record, in the order the table lists them.
CATEGORIES = ("rule site", "exact by design", "refused")


@dataclass(frozen=True)
class DescriptionRecord:
    r"""One line of :class:`ModelDescription`."""

    #: The module's path in the model (``"<model>"`` for the model itself,
    #: ``"<forward>"`` for an operation outside it).
    module: str
    #: ``"rule site"``, ``"exact by design"`` or ``"refused"``.
    category: str
    #: The rule (``"frozen norm"``, ``"rule 1 + q/k/v split"``, ``"gate/up
    #: split"``), the kind of product or softmax kept exact, or the rule refused.
    rule: str
    #: The form the rule reads (``"RMS, scale 1+w, eps 1e-06"``, ``"sdpa"``), or
    #: why the part is kept exact or refused.
    form: str


@dataclass
class ModelDescription:
    r"""
    What GIM does to a model: every rule site with its module path, rule and
    form, every product or softmax kept exact by design and why, and every
    refused part with the reason. ``str()`` (or :meth:`table`) gives a
    readable table; :attr:`records` the rows.
    """

    records: list[DescriptionRecord] = field(default_factory=list)
    #: Whether a forward pass was audited (``describe`` got example inputs).
    audited: bool = False
    #: Whether any operation of the audited forward pass depended on the inputs.
    inputs_seen: bool = True

    def of(self, category: str) -> list[DescriptionRecord]:
        r"""
        Returns:
            *list[DescriptionRecord]*: the records of one category
            (``"rule site"``, ``"exact by design"`` or ``"refused"``).
        """
        return [r for r in self.records if r.category == category]

    @property
    def rule_sites(self) -> list[DescriptionRecord]:
        return self.of("rule site")

    @property
    def exact(self) -> list[DescriptionRecord]:
        return self.of("exact by design")

    @property
    def refused(self) -> list[DescriptionRecord]:
        return self.of("refused")

    def table(self, width: int = 100) -> str:
        r"""
        Args:
            width (int, optional): Long reasons are cut to this many characters
                        per line (rule sites never are).
                        Default: 100

        Returns:
            *str*: one section per category, one aligned line per record.
        """
        lines: list[str] = []
        for category in CATEGORIES:
            rows = self.of(category)
            heading = {"rule site": "Rule sites", "exact by design": "Kept exact by design"}
            lines.append(f"{heading.get(category, 'Refused')} ({len(rows)})")
            module_width = max((len(r.module) for r in rows), default=0)
            rule_width = max((len(r.rule) for r in rows), default=0)
            for row in rows:
                text = f"  {row.module:<{module_width}}  {row.rule:<{rule_width}}  {row.form}"
                if category != "rule site" and len(text) > width:
                    text = text[: width - 3] + "..."
                lines.append(text.rstrip())
        if self.audited and not self.inputs_seen:
            lines.append(
                "(no operation of the audited forward pass depended on the inputs: give them "
                "requires_grad, or token ids that pass through an nn.Embedding)"
            )
        if not self.audited:
            lines.append(
                "(forward pass not audited: pass example_inputs to list every product and softmax)"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def describe(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    config: GIMConfig | None = None,
) -> ModelDescription:
    r"""
    Describes what GIM does to ``model``: where each rule goes and in which
    form, which products and softmaxes keep their exact gradient by design
    (GIM_SPEC.md: routing weights, output gates, per-layer-input gates,
    softmaxes outside attention, ...) and which parts are refused, with the
    reason. With ``example_inputs``, one forward pass is audited (the audit
    GIMAttribution runs on its first call, cached with the rule sites): every
    softmax, normalization and product of two input-dependent tensors appears.
    Nothing is changed on the model.

    Args:
        model (nn.Module): Any PyTorch module, usually a transformers model.
        example_inputs (Any, optional): Inputs of ``model``: a tensor, a tuple
                    of positional arguments, or a dict of keyword arguments
                    (e.g. ``tokenizer("text", return_tensors="pt")``). None:
                    only the rule sites found from the model's structure.
                    Default: None
        config (GIMConfig, optional): The settings whose refusals are listed
                    (a part is refused only for a rule that is on).
                    Default: ``GIMConfig()``, every rule

    Returns:
        *ModelDescription*: the records, printable as a table.

    Examples::

        >>> from captum_gim import describe
        >>> from captum_gim.models import load_model
        >>> model, tokenizer = load_model()
        >>> print(describe(model, tokenizer("the good movie ?", return_tensors="pt")))
        Rule sites (9)
          model.layers.0.self_attn  rule 1 + q/k/v split  sdpa
          ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"describe needs an nn.Module, got {type(model).__name__}.")
    config = GIMConfig() if config is None else config
    sites = cached_rule_sites(model, list(model.named_modules()), strict=True)
    audit: Audit | None = None
    if example_inputs is not None:
        audit = run_audit(model, sites, model_runner(model, example_inputs))
        store_audit(model, sites, audit)
    order = {name or "<model>": i for i, (name, _) in enumerate(model.named_modules())}
    records = sorted(_site_records(sites, audit), key=lambda r: order.get(r.module, len(order)))
    if audit is not None:
        records += [
            DescriptionRecord(e.module, "exact by design", e.kind, f"{e.operation}: {e.reason}")
            for e in audit.exact()
        ]
        records += [
            DescriptionRecord(e.module, "refused", e.kind, f"{e.operation}: {e.reason}")
            for e in audit.refused(config)
        ]
    records += [
        DescriptionRecord(_module_of(p.message), "refused", p.rule, p.message)
        for p in sites.problems
        if rule_is_on(p.rule, config)
    ]
    seen = audit is None or audit.inputs_seen
    return ModelDescription(records, audited=audit is not None, inputs_seen=seen)


def _site_records(sites: RuleSites, audit: Audit | None) -> list[DescriptionRecord]:
    records = [
        DescriptionRecord(n.name, "rule site", "frozen norm", _norm_form(n)) for n in sites.norms
    ]
    attention = "rule 1 + q/k/v split"
    for name, module in sites.attentions:
        implementation = attention_implementation(module) or "?"
        records.append(DescriptionRecord(name, "rule site", attention, implementation))
    for name, _ in sites.torch_attentions:
        records.append(DescriptionRecord(name, "rule site", attention, "nn.MultiheadAttention"))
    for name, _ in sites.traced_attentions:
        records.append(DescriptionRecord(name, "rule site", attention, "traced torch ops"))
    for mlp in sites.gated_mlps:
        records.append(DescriptionRecord(mlp.name, "rule site", "gate/up split", _gated_form(mlp)))
    for name, _ in [] if audit is None else audit.traced_gated_mlps:
        records.append(
            DescriptionRecord(
                name, "rule site", "gate/up split", "down(act(a(x)) * b(x)), by data flow"
            )
        )
    return records


def _norm_form(site: NormSite) -> str:
    if site.kind == "group":
        return "group norm, frozen statistic per group"
    if site.kind == "batch":
        return "batch norm, running statistics (affine in eval mode)"
    form = site.form
    assert isinstance(form, NormForm)
    shape = "LayerNorm" if form.centered else ("L2" if form.sum_square else "RMS")
    parts = [shape]
    parts.append("no scale" if form.scale == "none" else f"scale {form.scale}")
    if form.bias:
        parts.append("bias")
    parts.append(f"eps {form.eps:g}")
    return ", ".join(parts)


def _gated_form(site: GatedMLPSite) -> str:
    if site.layout is GatedLayout.EXPERTS:
        return "experts, fused gate_up_proj"
    if site.layout is GatedLayout.GATE_FUNCTION:
        return "experts, own gating function"
    structure = site.structure
    assert structure is not None
    activation = structure.activation or "inline activation"
    if structure.up is None:
        return f"{structure.down}({activation}(gate) * up), fused {structure.gate}"
    return f"{structure.down}({activation}({structure.gate}) * {structure.up})"


def _module_of(message: str) -> str:
    """The quoted module path a problem's message starts with."""
    if message.startswith("'") and "'" in message[1:]:
        return message[1 : message.index("'", 1)]
    return "<model>"
