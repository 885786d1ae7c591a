"""The serving layer around the engine: where a request enters, is validated, meets policy, and fails.

A request's path, for HTTP and gRPC alike::

    http_api.py / grpc_api.py   adapters: parse the wire format, call service.py, shape its answer
            │                   (openai_schema.py: the OpenAI request bodies; grpc_stubs.py: the proto)
            ▼
    service.py                  ModelService: the one entry point per operation (start_chat,
            │                   start_completion, count_tokens, model_info): model check, validation,
            │                   policy, prompt encoding, submit to the engine
            ├──▶ policy.py      the operator policy: schema, content scanner, stream filter, persona, defaults
            ▼
    model_service.llm           chat formatting, tool calling (llm/tools.py: tools in the model's format,
                                calls parsed from its answer), request validation (llm/requests.py: the
                                sampling fields), the batching engine; raises the llm/errors.py family

    errors.py                   the one table of error forms (HTTP status, OpenAI type/code, gRPC status)
    dynamic_config.py           the policy's sources (Nacos document, --policy-file), hot-reloaded, handed
                                to ModelService.apply_policy
    nacos.py                    registration in Nacos and the config listener
    http_server.py              uvicorn's transport settings (timeouts, header limits)
    main.py                     the process: start, load, serve, drain

Layer rules (imports point down only; no cycles):

- ``model_service.llm`` never imports ``model_service.server``.
- ``policy.py`` imports only ``llm``; ``dynamic_config.py`` only ``policy.py`` (and config);
  ``service.py`` imports ``llm`` and ``policy.py``; ``errors.py`` imports ``llm`` and ``policy.py``.
- The adapters call only ``service.py`` for work and ``errors.py`` for error forms; they use ``llm``
  types (GenerationOptions, RequestStream, the errors) as data, never the engine or tokenizer directly.
- Only ``main.py`` wires the pieces together.
"""
