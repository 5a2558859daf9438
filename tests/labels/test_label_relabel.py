"""Relabeling against Prometheus' documented behaviour (and its model/relabel tests)."""

from __future__ import annotations

import hashlib
import re
import struct

import pytest
import yaml

from agent.labels.relabel import (
    DEFAULT_RELABEL_CONFIGS,
    RelabelConfigError,
    expand,
    parse_relabel_configs,
    relabel,
    series_labels,
)


def run(labels: dict[str, str], configs_yaml: str) -> dict[str, str] | None:
    return relabel(labels, parse_relabel_configs(yaml.safe_load(configs_yaml)))


ABC = {"a": "foo", "b": "bar", "c": "baz"}


def test_replace_with_regex_groups() -> None:
    out = run(
        ABC,
        """
        - {source_labels: [a], regex: "f(.*)", target_label: d, replacement: "ch${1}"}
        """,
    )
    assert out == {**ABC, "d": "choo"}


def test_replace_chains_rules_and_joins_with_separator() -> None:
    # Prometheus' relabel_test.go: each rule sees the previous rule's output.
    out = run(
        ABC,
        """
        - {source_labels: [a, b], regex: "f(.*);(.*)r", target_label: a, replacement: "b${1}${2}m"}
        - {source_labels: [c, a], regex: "(b).*b(.*)ba(.*)", target_label: d,
           replacement: "$1$2$2$3"}
        """,
    )
    assert out == {"a": "boobam", "b": "bar", "c": "baz", "d": "boooom"}
    custom = run(ABC, "- {source_labels: [a, b], separator: '|', target_label: ab}")
    assert custom is not None and custom["ab"] == "foo|bar"


def test_regex_is_anchored_and_no_match_means_no_change() -> None:
    # "o" matches inside "foo" but the regex is anchored at both ends.
    assert run(ABC, "- {source_labels: [a], regex: 'o', target_label: d, replacement: x}") == ABC
    assert run(ABC, "- {source_labels: [a], regex: 'o', action: keep}") is None
    assert run(ABC, "- {source_labels: [a], regex: 'fo', action: drop}") == ABC
    # Python's $ would match before a trailing newline; Go's anchoring does not.
    assert run({"a": "foo\n"}, "- {source_labels: [a], regex: foo, action: keep}") is None


def test_default_regex_and_replacement_copy_the_value() -> None:
    assert run(ABC, "- {source_labels: [b], target_label: copy}") == {**ABC, "copy": "bar"}


def test_missing_source_labels_are_empty_strings() -> None:
    assert run(ABC, "- {source_labels: [a, missing], target_label: d}") == {**ABC, "d": "foo;"}
    assert run(ABC, "- {source_labels: [missing], regex: '', action: keep}") == ABC
    assert run(ABC, "- {source_labels: [missing], regex: '.+', action: keep}") is None
    # An empty result removes the target instead of setting it to "".
    assert run({**ABC, "d": "x"}, "- {source_labels: [missing], target_label: d}") == ABC


def test_replace_expands_the_target_label_and_drops_empty_results() -> None:
    out = run(
        {"a": "some-name-value"},
        "- {source_labels: [a], regex: 'some-([^-]+)-([^,]+)', target_label: '${1}', "
        "replacement: '${2}'}",
    )
    assert out == {"a": "some-name-value", "name": "value"}
    # A reference to a group that does not exist expands to "": the label goes away.
    out = run({**ABC, "d": "old"}, "- {source_labels: [a], target_label: d, replacement: '$2'}")
    assert out == ABC


def test_keep_and_drop() -> None:
    assert run(ABC, "- {source_labels: [a], regex: 'f.+', action: keep}") == ABC
    assert run(ABC, "- {source_labels: [a], regex: 'f.+', action: drop}") is None
    assert run(ABC, "- {source_labels: [a], regex: 'b.+', action: keep}") is None
    assert run(ABC, "- {source_labels: [a], regex: 'b.+', action: drop}") == ABC
    assert run(ABC, "- {source_labels: [a, b], regex: 'foo;bar', action: keep}") == ABC


def test_keepequal_and_dropequal() -> None:
    labels = {"a": "1", "b": "1", "c": "2"}
    assert run(labels, "- {source_labels: [a], target_label: b, action: keepequal}") == labels
    assert run(labels, "- {source_labels: [a], target_label: c, action: keepequal}") is None
    assert run(labels, "- {source_labels: [a], target_label: b, action: dropequal}") is None


def prometheus_hashmod(value: str, modulus: int) -> int:
    """Independent of the implementation: uint64 of md5's bytes 8..16, big-endian."""
    (last_eight,) = struct.unpack(">Q", hashlib.md5(value.encode()).digest()[8:16])
    return int(last_eight % modulus)


@pytest.mark.parametrize(
    ("value", "modulus"), [("baz", 1000), ("foo", 7), ("", 3), ("kube-system;coredns", 2**32)]
)
def test_hashmod(value: str, modulus: int) -> None:
    out = run(
        {"c": value},
        f"- {{source_labels: [c], target_label: d, modulus: {modulus}, action: hashmod}}",
    )
    assert out is not None and out["d"] == str(prometheus_hashmod(value, modulus))


def test_hashmod_matches_prometheus_test_vector() -> None:
    # relabel_test.go: c="baz", modulus 1000 -> "976".
    assert run(ABC, "- {source_labels: [c], target_label: d, modulus: 1000, action: hashmod}") == {
        **ABC,
        "d": "976",
    }


def test_labelmap() -> None:
    labels = {"a": "foo", "b1": "bar", "b2": "baz"}
    out = run(labels, "- {regex: '(b.*)', replacement: 'bar_${1}', action: labelmap}")
    assert out == {**labels, "bar_b1": "bar", "bar_b2": "baz"}
    meta = {"__meta_kubernetes_pod_label_app": "web", "__meta_other": "x"}
    out = run(meta, "- {regex: '__meta_kubernetes_pod_label_(.+)', action: labelmap}")
    assert out == {**meta, "app": "web"}


def test_labeldrop_and_labelkeep() -> None:
    labels = {"a": "foo", "b1": "bar", "b2": "baz"}
    assert run(labels, "- {regex: '(b.*)', action: labeldrop}") == {"a": "foo"}
    assert run(labels, "- {regex: '(b.*)', action: labelkeep}") == {"b1": "bar", "b2": "baz"}
    assert run(labels, "- {regex: 'b', action: labeldrop}") == labels  # anchored


def test_lowercase_and_uppercase() -> None:
    labels = {"foo": "bAr123Foo"}
    out = run(
        labels,
        """
        - {source_labels: [foo], target_label: foo_lower, action: lowercase}
        - {source_labels: [foo], target_label: foo_upper, action: UpperCase}
        """,
    )
    assert out == {**labels, "foo_lower": "bar123foo", "foo_upper": "BAR123FOO"}


def test_expand_follows_go_template_rules() -> None:
    match = re.fullmatch(r"(?P<first>a)(b)?(c)", "ac")
    assert match is not None
    assert expand("$1-${3}-$first-${first}x", match) == "a-c-a-ax"
    assert expand("$1x", match) == ""  # the name is "1x": no such group
    assert expand("$$1 $", match) == "$1 $"  # $$ is a literal $; a lone $ stays
    assert expand("${1", match) == "${1"  # malformed reference: literal
    assert expand("$2|$01|$9", match) == "||"  # unmatched, leading zero, out of range


def test_series_labels_drop_meta_and_pid() -> None:
    labels = {"__meta_process_pid": "7", "pid": "7", "node": "n1", "__address__": "x", "z": "1"}
    assert series_labels(labels) == (("node", "n1"), ("z", "1"))


def test_default_config_makes_the_documented_series_labels() -> None:
    discovered = {
        "node": "worker-1",
        "__meta_process_pid": "4242",
        "__meta_process_comm": "envoy",
        "__meta_process_executable": "/usr/local/bin/envoy",
        "__meta_kubernetes_namespace": "shop",
        "__meta_kubernetes_pod_name": "checkout-1",
        "__meta_kubernetes_container_name": "envoy",
        "__meta_kubernetes_pod_label_app": "checkout",
        "__meta_container_id": "ab" * 32,
        "__meta_systemd_unit": "cri-containerd-" + "ab" * 32 + ".scope",
    }
    out = relabel(discovered, DEFAULT_RELABEL_CONFIGS)
    assert out is not None
    assert dict(series_labels(out)) == {
        "node": "worker-1",
        "namespace": "shop",
        "pod": "checkout-1",
        "container": "envoy",
        "container_id": "ab" * 32,
        "systemd_unit": "cri-containerd-" + "ab" * 32 + ".scope",
        "comm": "envoy",
    }
    bare = relabel({"node": "worker-1", "__meta_process_comm": "sshd"}, DEFAULT_RELABEL_CONFIGS)
    assert bare is not None and series_labels(bare) == (("comm", "sshd"), ("node", "worker-1"))


@pytest.mark.parametrize(
    ("configs", "message"),
    [
        (
            "[{target_label: x}, {action: keep}, {action: foo}]",
            'relabel_configs[2].action: unknown action "foo"',
        ),
        ("[{action: hashmod, target_label: x}]", "relabel_configs[0].modulus: hashmod requires"),
        ("[{action: replace, source_labels: [a]}]", "relabel_configs[0].target_label: required"),
        (
            "[{action: lowercase, target_label: x, replacement: y}]",
            "[0].replacement: cannot be set",
        ),
        ("[{regex: '(', target_label: x}]", "relabel_configs[0].regex: invalid regular expression"),
        ("[{action: labeldrop, source_labels: [a]}]", "[0].source_labels: labeldrop takes only"),
        (
            "[{target_label: y}, {source_labels: [ok, 1bad], target_label: x}]",
            "[1].source_labels[1]: '1bad'",
        ),
        ("[{target_label: 'bad-name'}]", "[0].target_label: 'bad-name' is not a valid label"),
        ("[{target_label: pid, source_labels: [__meta_process_pid]}]", "[0].target_label: 'pid'"),
        ("[{sources: [a]}]", "relabel_configs[0]: unknown field 'sources'"),
        ("[{action: labelmap, replacement: '-'}]", "[0].replacement: '-' is not a valid"),
        ("[{modulus: -1, action: hashmod, target_label: x}]", "[0].modulus: expected an unsigned"),
        ("{action: keep}", "relabel_configs: expected a list"),
        ("[keep]", "relabel_configs[0]: expected a mapping"),
    ],
)
def test_config_errors_name_field_and_index(configs: str, message: str) -> None:
    with pytest.raises(RelabelConfigError) as error:
        parse_relabel_configs(yaml.safe_load(configs))
    assert message in str(error.value)


def test_config_defaults_and_case_insensitive_action() -> None:
    (config,) = parse_relabel_configs([{"source_labels": ["a"], "action": "Keep"}])
    assert (config.action, config.regex, config.separator, config.replacement) == (
        "keep",
        "(.*)",
        ";",
        "$1",
    )
    assert parse_relabel_configs(None) == []
