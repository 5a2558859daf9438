"""Prometheus `relabel_configs`, with Prometheus' semantics.

Same fields, defaults and actions as Prometheus (model/relabel): the regex is anchored
at both ends, `replacement` expands `$1`, `${1}`, `$name` and `$$` like Go's
Regexp.Expand, setting a label to "" deletes it, and hashmod takes the last 8 bytes of
the md5 of the joined source values, big-endian, modulo `modulus`. Regexes run on
Python's `re`, which agrees with Go's RE2 on the syntax relabel configs use (groups,
classes, alternation, repetition, (?i), (?P<name>)); what only one of them has
(Python's backreferences and lookarounds, Go's \\pL classes) is not screened out.
One deliberate difference: labelmap skips a rule's result when it is not a valid label name.

After relabeling, labels whose names start with "__" are dropped; what is left are the
series labels. `pid` is never a series label (it is a per-sample pprof label).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import yaml

ACTIONS = (
    "replace",
    "keep",
    "drop",
    "keepequal",
    "dropequal",
    "hashmod",
    "labelmap",
    "labeldrop",
    "labelkeep",
    "lowercase",
    "uppercase",
)
_FIELDS = (
    "source_labels",
    "separator",
    "regex",
    "target_label",
    "replacement",
    "modulus",
    "action",
)
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Prometheus' relabelTarget: a label name that may contain $1 / ${name} references.
_TEMPLATE_NAME = re.compile(r"^(?:(?:[a-zA-Z_]|\$(?:\{\w+\}|\w+))+\w*)+$")
_NEEDS_TARGET = {"replace", "hashmod", "lowercase", "uppercase", "keepequal", "dropequal"}
RESERVED_SERIES_LABELS = frozenset({"pid"})


class RelabelConfigError(ValueError):
    """A relabel config that Prometheus would reject; the message names field and index."""


@dataclass(frozen=True)
class RelabelConfig:
    """One validated relabel rule. Build with `parse_relabel_configs`."""

    source_labels: tuple[str, ...] = ()
    separator: str = ";"
    regex: str = "(.*)"
    target_label: str = ""
    replacement: str = "$1"
    modulus: int = 0
    action: str = "replace"

    @property
    def pattern(self) -> re.Pattern[str]:
        return _compiled(self.regex)


_DEFAULT = RelabelConfig()
_PATTERNS: dict[str, re.Pattern[str]] = {}
_LEADING_FLAGS = re.compile(r"\(\?([ims]+)\)")


def _compiled(regex: str) -> re.Pattern[str]:
    pattern = _PATTERNS.get(regex)
    if pattern is None:
        # fullmatch anchors both ends; "^...$" alone would let Python's $ match before "\n".
        # Go takes a leading "(?i)" inside the group Prometheus wraps the regex in; Python
        # 3.11 refuses global flags there, so they become the group's own: "(?i:...)".
        flags = _LEADING_FLAGS.match(regex)
        group = f"(?{flags[1]}:{regex[flags.end() :]})" if flags else f"(?:{regex})"
        pattern = _PATTERNS[regex] = re.compile(group)
    return pattern


def parse_relabel_configs(raw: object, where: str = "relabel_configs") -> list[RelabelConfig]:
    """Validate a list of dicts (as loaded from YAML); RelabelConfigError on the first fault."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RelabelConfigError(f"{where}: expected a list, got {type(raw).__name__}")
    return [_parse_one(item, f"{where}[{index}]") for index, item in enumerate(raw)]


def _parse_one(item: object, where: str) -> RelabelConfig:
    if not isinstance(item, dict):
        raise RelabelConfigError(f"{where}: expected a mapping, got {type(item).__name__}")
    unknown = sorted(str(key) for key in item if key not in _FIELDS)
    if unknown:
        raise RelabelConfigError(f"{where}: unknown field {unknown[0]!r}")
    given = {key: value for key, value in item.items() if value is not None}
    config = RelabelConfig(
        source_labels=_source_labels(given.get("source_labels", []), where),
        separator=_string(given, "separator", ";", where),
        regex=_regex(given, where),
        target_label=_string(given, "target_label", "", where),
        replacement=_string(given, "replacement", "$1", where),
        modulus=_modulus(given.get("modulus", 0), where),
        action=_action(given.get("action", "replace"), where),
    )
    _check_combination(config, where)
    return config


def _string(given: Mapping[str, object], key: str, default: str, where: str) -> str:
    value = given.get(key, default)
    if not isinstance(value, str):
        raise RelabelConfigError(f"{where}.{key}: expected a string, got {value!r}")
    return value


def _source_labels(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise RelabelConfigError(f"{where}.source_labels: expected a list of label names")
    for index, name in enumerate(value):
        if not isinstance(name, str) or not _LABEL_NAME.match(name):
            raise RelabelConfigError(
                f"{where}.source_labels[{index}]: {name!r} is not a valid label name"
            )
    return tuple(value)


def _regex(given: Mapping[str, object], where: str) -> str:
    regex = _string(given, "regex", "(.*)", where)
    try:
        _compiled(regex)
    except (re.error, OverflowError, RecursionError) as exc:  # a{4294967296}, deep nesting
        message = f"{where}.regex: invalid regular expression {regex!r}: {exc}"
        raise RelabelConfigError(message) from exc
    return regex


def _modulus(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise RelabelConfigError(f"{where}.modulus: expected an unsigned integer, got {value!r}")
    return value


def _action(value: object, where: str) -> str:
    action = value.lower() if isinstance(value, str) else ""
    if action not in ACTIONS:
        raise RelabelConfigError(f'{where}.action: unknown action "{value}"')
    return action


def _check_combination(config: RelabelConfig, where: str) -> None:
    """The cross-field checks of Prometheus' relabel.Config.UnmarshalYAML."""
    action, target = config.action, config.target_label
    changed = {name for name in _FIELDS if getattr(config, name) != getattr(_DEFAULT, name)}
    if action == "hashmod" and config.modulus == 0:
        raise RelabelConfigError(f"{where}.modulus: hashmod requires a non-zero modulus")
    if action in _NEEDS_TARGET and not target:
        raise RelabelConfigError(f"{where}.target_label: required for the {action} action")
    if action == "replace" and "$" in target:
        valid_target = bool(_TEMPLATE_NAME.match(target))
    else:
        valid_target = bool(_LABEL_NAME.match(target))
    if action in _NEEDS_TARGET and not valid_target:
        raise RelabelConfigError(
            f"{where}.target_label: {target!r} is not a valid label name for {action}"
        )
    if target in RESERVED_SERIES_LABELS:
        raise RelabelConfigError(
            f"{where}.target_label: {target!r} is a per-sample label and cannot be a series label"
        )
    if action in {"lowercase", "uppercase", "keepequal", "dropequal"} and "replacement" in changed:
        raise RelabelConfigError(f"{where}.replacement: cannot be set for the {action} action")
    if action in {"keepequal", "dropequal"} and changed & {"regex", "modulus", "separator"}:
        raise RelabelConfigError(
            f"{where}: {action} takes only source_labels and target_label, no other fields"
        )
    if action == "labelmap" and not _TEMPLATE_NAME.match(config.replacement):
        raise RelabelConfigError(
            f"{where}.replacement: {config.replacement!r} is not a valid label name template"
        )
    if action in {"labeldrop", "labelkeep"} and changed - {"regex", "action"}:
        extra = sorted(changed - {"regex", "action"})[0]
        raise RelabelConfigError(f"{where}.{extra}: {action} takes only a regex")


def relabel(labels: Mapping[str, str], configs: Iterable[RelabelConfig]) -> dict[str, str] | None:
    """Apply the rules in order; None when a rule drops the target. Empty values are unset."""
    current = {name: value for name, value in labels.items() if value}
    for config in configs:
        if not _apply(current, config):
            return None
    return current


def series_labels(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The series labels of relabeled labels: sorted, without "__*" and reserved names."""
    return tuple(
        sorted(
            (name, value)
            for name, value in labels.items()
            if value and not name.startswith("__") and name not in RESERVED_SERIES_LABELS
        )
    )


def _set(labels: dict[str, str], name: str, value: str) -> None:
    if value:
        labels[name] = value
    else:
        labels.pop(name, None)


def _apply(labels: dict[str, str], config: RelabelConfig) -> bool:
    value = config.separator.join(labels.get(name, "") for name in config.source_labels)
    action, pattern = config.action, config.pattern
    if action in ("keep", "drop"):
        return (pattern.fullmatch(value) is not None) == (action == "keep")
    if action in ("keepequal", "dropequal"):
        return (labels.get(config.target_label, "") == value) == (action == "keepequal")
    if action == "replace":
        _replace(labels, config, value)
    elif action in ("lowercase", "uppercase"):
        _set(labels, config.target_label, value.lower() if action == "lowercase" else value.upper())
    elif action == "hashmod":
        _set(labels, config.target_label, str(hashmod(value, config.modulus)))
    elif action == "labelmap":
        for name, label_value in sorted(labels.items()):  # Prometheus: in label-name order
            if (match := pattern.fullmatch(name)) and _LABEL_NAME.match(
                target := expand(config.replacement, match)
            ):
                _set(labels, target, label_value)
    elif action in ("labeldrop", "labelkeep"):
        for name in list(labels):
            if (pattern.fullmatch(name) is not None) == (action == "labeldrop"):
                del labels[name]
    return True


def _replace(labels: dict[str, str], config: RelabelConfig, value: str) -> None:
    match = config.pattern.fullmatch(value)
    if match is None:
        return  # no match: no replacement
    target = expand(config.target_label, match)
    if not _LABEL_NAME.match(target):
        labels.pop(config.target_label, None)
        return
    _set(labels, target, expand(config.replacement, match))


def hashmod(value: str, modulus: int) -> int:
    """Prometheus' hashmod: last 8 bytes of md5(value) as a big-endian uint64, mod modulus."""
    try:  # values read from /proc carry undecodable bytes as surrogateescapes
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # other lone surrogates (e.g. from JSON "\ud800")
        data = value.encode("utf-8", "surrogatepass")
    digest = hashlib.md5(data, usedforsecurity=False).digest()
    return int.from_bytes(digest[8:], "big") % modulus


def expand(template: str, match: re.Match[str]) -> str:
    """Go's Regexp.ExpandString: $1, ${1}, $name, ${name}; $$ is "$"; unknown refs are ""."""
    out: list[str] = []
    rest = template
    while (dollar := rest.find("$")) >= 0:
        out.append(rest[:dollar])
        rest = rest[dollar + 1 :]
        if rest.startswith("$"):
            out.append("$")
            rest = rest[1:]
            continue
        parsed = _reference(rest)
        if parsed is None:
            out.append("$")  # malformed: the "$" is literal text
            continue
        name, rest = parsed
        out.append(_group(match, name))
    out.append(rest)
    return "".join(out)


def _reference(text: str) -> tuple[str, str] | None:
    """Split "name..." or "{name}..." into (name, rest); None when malformed (Go's extract)."""
    brace = text.startswith("{")
    body = text[1:] if brace else text
    length = 0
    while length < len(body) and (body[length].isalnum() or body[length] == "_"):
        length += 1
    if length == 0:
        return None
    name = body[:length]
    if brace:
        if length >= len(body) or body[length] != "}":
            return None
        length += 1
    return name, body[length:]


def _group(match: re.Match[str], name: str) -> str:
    if name.isdigit() and name.isascii():
        if len(name) > 1 and name[0] == "0":
            return ""  # Go: leading zeros make it a name, and no group has that name
        if len(name) > 8:
            return ""  # Go: 1e8 or more is a name too; int() would refuse >4300 digits
        index = int(name)
        return (match.group(index) or "") if index <= (match.re.groups) else ""
    if name in match.re.groupindex:
        return match.group(name) or ""
    return ""


# The series labels Strobe ships by default: node plus who ran the process.
DEFAULT_RELABEL_CONFIGS_YAML = """\
- source_labels: [__meta_kubernetes_namespace]
  target_label: namespace
- source_labels: [__meta_kubernetes_pod_name]
  target_label: pod
- source_labels: [__meta_kubernetes_container_name]
  target_label: container
- source_labels: [__meta_container_id]
  target_label: container_id
- source_labels: [__meta_systemd_unit]
  target_label: systemd_unit
- source_labels: [__meta_process_comm]
  target_label: comm
"""
DEFAULT_RELABEL_CONFIGS: tuple[RelabelConfig, ...] = tuple(
    parse_relabel_configs(yaml.safe_load(DEFAULT_RELABEL_CONFIGS_YAML), "default_relabel_configs")
)
