"""relabel_configs on arbitrary YAML-like values, and relabeling arbitrary label sets.

parse_relabel_configs either returns rules or raises RelabelConfigError naming the rule
(`relabel_configs[i]...`); valid rules never raise on any labels; series labels never
carry "__" names or the per-sample `pid`.
"""

from __future__ import annotations

from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from agent.labels.relabel import (
    ACTIONS,
    RelabelConfig,
    RelabelConfigError,
    parse_relabel_configs,
    relabel,
    series_labels,
)
from tests.fuzz import any_text, fuzz_settings

FIELDS = ("source_labels", "separator", "regex", "target_label", "replacement", "modulus", "action")
LABEL_NAME = st.from_regex(r"\A[a-zA-Z_][a-zA-Z0-9_]{0,12}\Z").filter(lambda n: n != "pid")
# Regexes a user may write, some broken, some that only Python or only Go accept, some
# that overflow or nest beyond Python's parser (those must still be config errors).
REGEX = st.one_of(
    st.sampled_from(
        [
            "(.*)",
            ".*",
            "",
            "(.+)@(.+)",
            "__meta_(.+)",
            "(?P<name>[a-z]+)-(.*)",
            "(?i)FOO|bar",
            "([^;]*);(.*)",
            "\\d{1,3}",
            "a)(b",
            "(",
            "[",
            "\\",
            "*",
            "a{4294967296}",
            "x{2,1}",
            "(?P<1>a)",
            "(?<=a+)b",
            "\\pL+",
            "(" * 1200 + ")" * 1200,
        ]
    ),
    any_text,
)
TEMPLATE = st.one_of(
    st.sampled_from(["$1", "${1}", "$name", "${name}", "$$", "$", "${", "${1", "$01", "x$2y"]),
    st.just("$" + "1" * 5000),  # more digits than int() takes from a string
    st.just("${" + "9" * 5000 + "}"),
    any_text,
    LABEL_NAME,
)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), any_text)
# What yaml.safe_load can give: nested lists and mappings of scalars.
YAML_VALUE = st.recursive(
    SCALAR,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(any_text, st.integers(), st.none()), inner, max_size=4),
    ),
    max_leaves=12,
)
FIELD_VALUE: dict[str, st.SearchStrategy[Any]] = {
    "source_labels": st.one_of(st.lists(st.one_of(LABEL_NAME, SCALAR), max_size=3), YAML_VALUE),
    "separator": st.one_of(st.sampled_from([";", "", "|"]), YAML_VALUE),
    "regex": st.one_of(REGEX, YAML_VALUE),
    "target_label": st.one_of(LABEL_NAME, TEMPLATE, st.just("pid"), YAML_VALUE),
    "replacement": st.one_of(TEMPLATE, YAML_VALUE),
    "modulus": st.one_of(
        st.integers(-1, 2**64 + 1), st.sampled_from([2**64 - 1, 2**64]), YAML_VALUE
    ),
    "action": st.one_of(st.sampled_from(ACTIONS + ("KEEP", "Replace", "nope", "")), YAML_VALUE),
}


@st.composite
def rule_like(draw: st.DrawFn) -> dict[Any, Any]:
    """A mapping that is mostly relabel fields with plausible (and implausible) values."""
    names = draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=len(FIELDS)))
    rule: dict[Any, Any] = {name: draw(FIELD_VALUE[name]) for name in names}
    if draw(st.integers(0, 9)) == 0:
        rule[draw(st.one_of(any_text, st.integers()))] = draw(SCALAR)  # an unknown key
    return rule


RAW_CONFIGS = st.one_of(YAML_VALUE, st.lists(st.one_of(rule_like(), YAML_VALUE), max_size=4))


@fuzz_settings(600)
@given(RAW_CONFIGS)
@example([{"regex": "a{4294967296}"}])
@example([{"regex": "(" * 1200 + ")" * 1200, "action": "keep"}])
def test_parse_gives_rules_or_a_config_error_naming_the_rule(raw: object) -> None:
    try:
        configs = parse_relabel_configs(raw)
    except RelabelConfigError as exc:
        message = str(exc)
        assert message.startswith("relabel_configs")
        if isinstance(raw, list):
            assert message.startswith("relabel_configs["), message
        return
    assert isinstance(configs, list)
    assert all(isinstance(config, RelabelConfig) for config in configs)


# --- valid rules, per action ----------------------------------------------------------

VALID_REGEX = st.sampled_from(
    ["(.*)", ".*", "", "(.+)@(.+)", "__meta_(.+)", "(?P<name>[a-z]+)-(.*)", "(?i)FOO|bar",
     "([^;]*);(.*)", "\\d{1,3}", "a)(b", "(.)(.)(.)", "[^_].*"]
)  # fmt: skip
SOURCES = st.lists(LABEL_NAME, max_size=3)


def valid_rules() -> st.SearchStrategy[dict[str, Any]]:
    target_template = st.one_of(LABEL_NAME, st.sampled_from(["$1", "${1}_x", "$name", "a$2"]))
    return st.one_of(
        st.fixed_dictionaries(
            {"action": st.just("replace"), "target_label": target_template},
            optional={"source_labels": SOURCES, "regex": VALID_REGEX, "replacement": TEMPLATE,
                      "separator": st.sampled_from([";", "", "|"])},
        ),
        st.fixed_dictionaries(
            {"action": st.sampled_from(["keep", "drop"])},
            optional={"source_labels": SOURCES, "regex": VALID_REGEX},
        ),
        st.fixed_dictionaries(
            {"action": st.just("hashmod"), "target_label": LABEL_NAME,
             "modulus": st.integers(1, 2**64 - 1)},
            optional={"source_labels": SOURCES},
        ),
        st.fixed_dictionaries(
            {"action": st.just("labelmap")},
            optional={"regex": VALID_REGEX,
                      "replacement": st.sampled_from(["$1", "${1}", "x_$1", "${name}", "$2$1"])},
        ),
        st.fixed_dictionaries(
            {"action": st.sampled_from(["labeldrop", "labelkeep"])},
            optional={"regex": VALID_REGEX},
        ),
        st.fixed_dictionaries(
            {"action": st.sampled_from(["lowercase", "uppercase", "keepequal", "dropequal"]),
             "target_label": LABEL_NAME},
            optional={"source_labels": SOURCES},
        ),
    )  # fmt: skip


LABELS = st.dictionaries(
    st.one_of(LABEL_NAME, st.sampled_from(["__name__", "__meta_x", "__address__", "pid"])),
    any_text,
    max_size=6,
)


@fuzz_settings(500)
@given(st.lists(valid_rules(), max_size=4), LABELS)
@example([{"action": "hashmod", "target_label": "h", "modulus": 7, "source_labels": ["a"]}],
         {"a": "comm\udcff"})  # fmt: skip
@example([{"action": "replace", "target_label": "t", "replacement": "$" + "1" * 5000}], {"a": "x"})
def test_valid_rules_relabel_any_labels(raw: list[dict[str, Any]], labels: dict[str, str]) -> None:
    configs = parse_relabel_configs(raw)  # the strategy only makes rules Prometheus accepts
    out = relabel(labels, configs)
    if out is None:
        return
    assert all(isinstance(value, str) and value for value in out.values())
    series = series_labels(out)
    assert list(series) == sorted(series)
    assert not any(name.startswith("__") or name == "pid" for name, _ in series)
    assert all(value for _, value in series)


@fuzz_settings(300)
@given(st.dictionaries(any_text, any_text, max_size=8))
def test_series_labels_never_keep_reserved_names(labels: dict[str, str]) -> None:
    series = series_labels(labels)
    assert not any(name.startswith("__") or name == "pid" for name, _ in series)
    kept = {name for name, value in labels.items() if value}
    assert {name for name, _ in series} == {n for n in kept if not n.startswith("__")} - {"pid"}


@fuzz_settings(100)
@given(st.from_regex(r"\A[a-z]{1,8}\Z"), st.data())
def test_leading_case_flag_matches_like_go(word: str, data: st.DataObject) -> None:
    """Go takes "(?i)" at the start of a relabel regex (Python 3.11 refuses it mid-group)."""
    spelled = "".join(data.draw(st.sampled_from([c, c.upper()])) for c in word)
    raw = [{"source_labels": ["v"], "regex": f"(?i){word}", "action": "keep"}]
    configs = parse_relabel_configs(raw)
    assert relabel({"v": spelled}, configs) == {"v": spelled}
    assert relabel({"v": spelled + "x"}, configs) is None
    joined = parse_relabel_configs([{**raw[0], "regex": f"(?i){word}|zz"}])
    assert relabel({"v": "ZZ"}, joined) == {"v": "ZZ"}
