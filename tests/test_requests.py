"""The one list of sampling fields: every place that names them is derived from it."""

from __future__ import annotations

import dataclasses

import pytest

from model_service.llm.errors import InvalidRequest
from model_service.llm.requests import SAMPLING_FIELDS, GenerationOptions, to_sampling_params
from model_service.server.grpc_api import generation_options
from model_service.server.grpc_stubs import llm_pb2
from model_service.server.openai_schema import ChatCompletionRequest, CompletionRequest
from model_service.server.policy import GenerationDefaults

NAMES = [f.name for f in SAMPLING_FIELDS]


def test_every_surface_has_exactly_the_listed_fields():
    assert [f.name for f in dataclasses.fields(GenerationOptions)] == NAMES
    for schema in (ChatCompletionRequest, CompletionRequest):
        assert set(NAMES) <= set(schema.model_fields)
    for message in (llm_pb2.ChatRequest, llm_pb2.CompleteRequest):
        assert set(NAMES) <= set(message.DESCRIPTOR.fields_by_name)
    assert list(GenerationDefaults.model_fields) == [f.name for f in SAMPLING_FIELDS if f.operator_default]


def test_grpc_and_http_translate_to_the_same_options():
    values = {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "seed": 3, "stop": ["x"],
              "presence_penalty": 0.1, "frequency_penalty": 0.2, "repetition_penalty": 1.1, "ignore_eos": True}
    assert set(values) == set(NAMES)
    http = ChatCompletionRequest.model_validate({"messages": [], **values}).generation_options()
    grpc = generation_options(llm_pb2.ChatRequest(**values))
    assert http == grpc == GenerationOptions(**values)
    assert generation_options(llm_pb2.ChatRequest()) == GenerationOptions()  # unset stays None


@pytest.mark.parametrize("name,value", [("temperature", 2.5), ("top_p", 0.0), ("top_k", -2), ("max_tokens", 0),
                                        ("presence_penalty", float("nan")), ("repetition_penalty", 0.0)])
def test_out_of_bounds_values_name_their_field(name, value):
    with pytest.raises(InvalidRequest) as err:
        to_sampling_params(GenerationOptions(**{name: value}), prompt_tokens=5, context_length=100,
                           default_max_tokens=10)
    assert err.value.param == name
