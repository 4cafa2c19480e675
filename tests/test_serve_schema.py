"""The server answers as its OpenAPI schema says: schemathesis generates requests from /openapi.json (valid ones and
deliberately invalid ones) and checks every status code, content type, header and body against the schema, and
that valid requests are accepted and invalid ones refused.

Bounded: a few examples per operation against a tiny model with the server's limits turned low, in-process (ASGI),
so the whole run takes seconds.
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install schemathesis)")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402  (hypothesis comes with schemathesis)
from hypothesis import strategies as st  # noqa: E402

KEY = "schema-key"
MAX_CHOICES = 4


@pytest.fixture(scope="module")
def api_schema(tiny_model):
    from tunelab.inference.host import Host
    from tunelab.inference.server import create_app

    app = create_app(Host.load(tiny_model, served_name="tiny"), api_key=KEY, max_tokens=2, max_choices=MAX_CHOICES,
                     max_body_bytes=64 * 1024)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def within_cross_field_rules(body, vocab: int) -> bool:
    """Rules JSON Schema cannot state (the fields' descriptions do): prompts x n <= --max-choices, one with stream;
    token ids (of a token prompt, logit_bias keys) inside the model's vocabulary."""
    prompts = body.get("prompt", "")
    if isinstance(prompts, str) or (prompts and not isinstance(prompts[0], (str, list))):
        prompts = [prompts]  # one text, or one prompt of token ids
    choices = len(prompts) * (body.get("n") or 1)  # null n: the default, 1
    ids = [t for p in prompts if isinstance(p, list) for t in p] + [int(k) for k in body.get("logit_bias") or {}]
    return choices <= MAX_CHOICES and not (body.get("stream") and choices > 1) and all(t < vocab for t in ids)


# Each operation's requests are drawn with Hypothesis directly (schemathesis' own pytest integration,
# `schemathesis.pytest.from_fixture`, does not run under pytest 9).
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_server_conforms_to_its_schema(api_schema, mode, tiny_model):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tiny_model))
    operations = [r.ok() for r in api_schema.get_all_operations()]
    assert len(operations) == 5  # health, models, model, chat completions, completions

    for operation in operations:
        if mode == "negative" and not len(operation.body):
            continue  # only a body can be wrong: a path parameter is any string, and the GETs take nothing else

        @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)),
               served=st.booleans())
        @settings(max_examples=10, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                         HealthCheck.data_too_large])
        def conforms(case, served):
            if isinstance(case.body, dict):
                if served and isinstance(case.body.get("model"), str):
                    case.body["model"] = "tiny"  # a random name only ever reaches the 404
                if mode == "positive":
                    assume(within_cross_field_rules(case.body, vocab))
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"})

        conforms()
