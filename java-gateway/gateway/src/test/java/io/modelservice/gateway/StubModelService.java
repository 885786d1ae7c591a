package io.modelservice.gateway;

import java.time.Duration;
import java.util.List;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.atomic.AtomicLong;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import io.netty.handler.codec.http.HttpHeaders;
import reactor.core.publisher.Flux;
import reactor.core.publisher.Mono;
import reactor.netty.DisposableServer;
import reactor.netty.http.server.HttpServer;
import reactor.netty.http.server.HttpServerRequest;
import reactor.netty.http.server.HttpServerResponse;

/** A tiny stand-in for a model-service pod: OpenAI-shaped answers with usage, SSE with delays, failure modes. */
final class StubModelService implements AutoCloseable {

    record Recorded(long seq, HttpHeaders headers, String body) {
    }

    private static final AtomicLong SEQ = new AtomicLong();

    static final ObjectMapper JSON = new ObjectMapper();

    final String name;
    final List<Recorded> requests = new CopyOnWriteArrayList<>();
    volatile int failWith;
    /** The body of GET /metrics (null: 404, as the stubs had no metrics before). */
    volatile String metrics;
    /** GET /metrics never answers (a pod whose metrics endpoint hangs while it still serves requests). */
    volatile boolean metricsHang;
    private final DisposableServer server;

    private final String host;

    private StubModelService(String name, String host) {
        this.name = name;
        this.host = host;
        this.server = HttpServer.create().host(host).port(0)
                .route(routes -> routes
                        .post("/v1/chat/completions", this::chat)
                        .get("/metrics", (req, res) -> metricsHang ? Mono.never()
                                : metrics == null ? res.status(404).send()
                                : res.header("content-type", "text/plain").sendString(Mono.just(metrics)))
                        .get("/v1/models", (req, res) -> res.header("content-type", "application/json")
                                .sendString(Mono.just("{\"object\":\"list\",\"data\":[{\"id\":\"stub-model\"}]}"))))
                .bindNow();
    }

    static StubModelService start(String name) {
        return new StubModelService(name, "127.0.0.1");
    }

    /** A stub listening on another loopback address (e.g. 127.0.0.2). */
    static StubModelService start(String name, String host) {
        return new StubModelService(name, host);
    }

    /** Pretends to be a pod with this many requests running and waiting (its Prometheus gauges). */
    void load(int running, int waiting) {
        metrics = "# TYPE model_service_num_requests_running gauge\n"
                + "model_service_num_requests_running{model_name=\"stub-model\"} " + running + ".0\n"
                + "# TYPE model_service_num_requests_waiting gauge\n"
                + "model_service_num_requests_waiting{model_name=\"stub-model\"} " + waiting + ".0\n";
    }

    int port() {
        return server.port();
    }

    String url() {
        return "http://" + host + ":" + port();
    }

    /** The request most recently received by any of the given stubs. */
    static Recorded newest(StubModelService... stubs) {
        Recorded newest = null;
        for (StubModelService stub : stubs) {
            for (Recorded r : stub.requests) {
                if (newest == null || r.seq() > newest.seq()) {
                    newest = r;
                }
            }
        }
        return newest;
    }

    private Mono<Void> chat(HttpServerRequest req, HttpServerResponse res) {
        return req.receive().aggregate().asString().defaultIfEmpty("").flatMap(body -> {
            requests.add(new Recorded(SEQ.incrementAndGet(), req.requestHeaders().copy(), body));
            if (failWith > 0) {
                return res.status(failWith).header("content-type", "application/json")
                        .sendString(Mono.just("{\"error\":{\"message\":\"stub " + name + " failing\",\"type\":"
                                + "\"server_error\",\"param\":null,\"code\":\"service_unavailable\"}}")).then();
            }
            JsonNode json;
            try {
                json = JSON.readTree(body);
            } catch (Exception e) {
                return res.status(400).sendString(Mono.just("bad json")).then();
            }
            String model = json.path("model").asText("stub-model");
            if (json.path("stream").asBoolean(false)) {
                boolean usage = json.path("stream_options").path("include_usage").asBoolean(false);
                String u = usage ? ",\"usage\":null" : "";
                Flux<String> tokens = Flux.interval(Duration.ofMillis(150)).take(5).map(i ->
                        "data: {\"id\":\"s\",\"model\":\"" + model + "\",\"choices\":[{\"index\":0,\"delta\":"
                                + "{\"content\":\"t" + i + " \"},\"finish_reason\":null}]" + u + "}\n\n");
                Flux<String> tail = Flux.just(
                        "data: {\"id\":\"s\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]"
                                + u + "}\n\n");
                if (usage) {
                    tail = tail.concatWithValues("data: {\"id\":\"s\",\"choices\":[],\"usage\":{\"prompt_tokens\":25,"
                            + "\"completion_tokens\":5,\"total_tokens\":30}}\n\n");
                }
                tail = tail.concatWithValues("data: [DONE]\n\n");
                return res.header("content-type", "text/event-stream").header("cache-control", "no-cache")
                        .sendString(tokens.concatWith(tail)).then();
            }
            return res.header("content-type", "application/json").header("server", "uvicorn")
                    .sendString(Mono.just("{\"id\":\"x\",\"object\":\"chat.completion\",\"model\":\"" + model + "\","
                            + "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"from "
                            + name + "\"},\"finish_reason\":\"stop\"}],"
                            + "\"usage\":{\"prompt_tokens\":25,\"completion_tokens\":5,\"total_tokens\":30}}"))
                    .then();
        });
    }

    @Override
    public void close() {
        server.disposeNow();
    }
}
