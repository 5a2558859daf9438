"""Property and fuzz tests (hypothesis): parsers and builders on arbitrary input.

Every test here is reproducible: `fuzz_settings` derandomizes hypothesis (the seed comes
from the test itself) and keeps no example database, so CI sees the same examples on every
run. Timing is never asserted (deadline=None); example counts keep the whole directory
well under a minute on a loaded 2-core machine.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import providers

# Hypothesis mixes literals from every project module imported so far into what it draws,
# so the examples of a derandomized test would depend on which tests ran before it and on
# any constant changed anywhere. Draw from its built-in constants only: same examples in
# every run and order. (Private API; the version is pinned in pyproject.toml.)
_NO_LOCAL_CONSTANTS = providers.Constants()
providers._get_local_constants = lambda: _NO_LOCAL_CONSTANTS


def fuzz_settings(max_examples: int) -> settings:
    """Reproducible settings for one property: fixed examples, no deadline, no database."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Text as Strobe sees it from a host: /proc and ELF bytes decoded with surrogateescape,
# so lone surrogates \udc80-\udcff stand for bytes that are not UTF-8.
host_text = st.binary(max_size=64).map(lambda raw: raw.decode("utf-8", "surrogateescape"))
# Characters that break parsers: line breaks str.splitlines() knows, NUL, separators,
# lone surrogates (escaped bytes and others), non-characters, XML-forbidden controls.
TRICKY_CHARS = (
    "\x00\n\r\t\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\udc80\udcff\ud800\ufffe\uffff"
    "\x01\x1b\x7f ()[]:;/-_$={},\"'<>&\\"
)
# Any text at all, with the tricky characters far more often than chance would give.
any_text = st.one_of(
    st.text(max_size=64),
    st.text(
        st.one_of(st.characters(codec=None, exclude_categories=()), st.sampled_from(TRICKY_CHARS)),
        max_size=48,
    ),
    host_text,
)
