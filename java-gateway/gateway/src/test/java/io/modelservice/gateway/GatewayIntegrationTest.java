package io.modelservice.gateway;

import java.io.IOException;
import java.net.URI;
import java.net.ServerSocket;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;

import io.github.resilience4j.circuitbreaker.CircuitBreaker;
import io.github.resilience4j.circuitbreaker.CircuitBreakerConfig;
import io.github.resilience4j.timelimiter.TimeLimiterRegistry;
import io.micrometer.core.instrument.MeterRegistry;
import io.modelservice.gateway.auth.Authenticator;
import io.modelservice.gateway.route.InstanceBreakers;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;
import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.boot.test.autoconfigure.actuate.observability.AutoConfigureObservability;
import org.springframework.boot.test.context.SpringBootTest;
import org.springframework.boot.test.web.server.LocalManagementPort;
import org.springframework.boot.test.web.server.LocalServerPort;
import org.springframework.core.ParameterizedTypeReference;
import org.springframework.http.MediaType;
import org.springframework.http.codec.ServerSentEvent;
import org.springframework.cloud.circuitbreaker.resilience4j.ReactiveResilience4JCircuitBreakerFactory;
import org.springframework.test.context.DynamicPropertyRegistry;
import org.springframework.test.context.DynamicPropertySource;
import org.springframework.test.web.reactive.server.WebTestClient;
import org.springframework.web.reactive.function.client.WebClient;

import static org.assertj.core.api.Assertions.assertThat;

/**
 * The whole gateway (routes, filters, load balancer, retries, breakers) in front of stub model services found
 * through Spring Cloud's simple discovery client (Nacos is off here; the Python end-to-end tests use a real one).
 */
@AutoConfigureObservability
@SpringBootTest(webEnvironment = SpringBootTest.WebEnvironment.RANDOM_PORT)
class GatewayIntegrationTest {

    static final StubModelService GOOD = StubModelService.start("good");
    static final StubModelService FLAKY = StubModelService.start("flaky");
    /** Registered like a pod, but outside the allowed networks (127.0.0.1/32 here): must never get a request. */
    static final StubModelService INTRUDER = StubModelService.start("intruder", "127.0.0.2");
    static final int DEAD_PORT = freePort();

    @DynamicPropertySource
    static void properties(DynamicPropertyRegistry r) {
        r.add("spring.cloud.nacos.discovery.enabled", () -> "false");
        r.add("spring.cloud.service-registry.auto-registration.enabled", () -> "false");
        String simple = "spring.cloud.discovery.client.simple.instances.";
        r.add(simple + "model-service[0].uri", GOOD::url);
        r.add(simple + "model-service[1].uri", FLAKY::url);
        r.add(simple + "model-service[2].uri", () -> "http://127.0.0.1:" + DEAD_PORT);
        r.add(simple + "model-service[3].uri", INTRUDER::url);
        r.add(simple + "model-service[4].uri", () -> "http://localhost:" + GOOD.port());  // a host name: refused
        r.add("llm-gateway.upstream.allowed-networks", () -> "127.0.0.1/32,::1/128");
        r.add(simple + "down-service[0].uri", () -> "http://127.0.0.1:" + DEAD_PORT);
        r.add(simple + "down-service2[0].uri", () -> "http://127.0.0.1:" + DEAD_PORT);
        r.add("llm-gateway.internal-api-key", () -> "internal-secret");
        r.add("llm-gateway.max-body-size", () -> "2KB");
        r.add("llm-gateway.routes[0].id", () -> "model-service");
        r.add("llm-gateway.routes[0].service", () -> "model-service");
        r.add("llm-gateway.routes[1].id", () -> "down");
        r.add("llm-gateway.routes[1].service", () -> "down-service");
        r.add("llm-gateway.routes[1].models[0]", () -> "down-model");
        r.add("llm-gateway.routes[2].id", () -> "with-fallback");
        r.add("llm-gateway.routes[2].service", () -> "down-service2");
        r.add("llm-gateway.routes[2].models[0]", () -> "fb-model");
        r.add("llm-gateway.routes[2].fallback-route", () -> "model-service");
        r.add("llm-gateway.routes[2].fallback-model", () -> "stub-model");
        // breaker tuning is configuration: one route gets its own block on top of configs.default
        r.add("resilience4j.circuitbreaker.instances.down.base-config", () -> "default");
        r.add("resilience4j.circuitbreaker.instances.down.wait-duration-in-open-state", () -> "16s");
        key(r, 0, "alice", "sk-alice", 100_000, "");
        key(r, 1, "tiny", "sk-tiny", 10, "");
        key(r, 2, "restricted", "sk-restricted", 100_000, "only-this-model");
        key(r, 3, "burst", "sk-burst", 300, "");
        key(r, 4, "leaver", "sk-leaver", 100_000, "");
    }

    static void key(DynamicPropertyRegistry r, int i, String name, String key, long tpm, String model) {
        String p = "llm-gateway.api-keys[" + i + "].";
        r.add(p + "name", () -> name);
        r.add(p + "sha256", () -> Authenticator.sha256Hex(key));
        r.add(p + "tokens-per-minute", () -> tpm);
        r.add(p + "requests-per-minute", () -> 1000);
        if (!model.isEmpty()) {
            r.add(p + "models[0]", () -> model);
        }
    }

    @AfterAll
    static void stopStubs() {
        GOOD.close();
        FLAKY.close();
        INTRUDER.close();
    }

    @LocalServerPort
    int port;

    @LocalManagementPort
    int managementPort;

    @Autowired
    MeterRegistry meters;

    @Autowired
    WebTestClient client;

    @Autowired
    InstanceBreakers breakers;

    @Autowired
    ReactiveResilience4JCircuitBreakerFactory routeBreakers;

    @Autowired
    TimeLimiterRegistry timeLimiters;

    static final String CHAT = "{\"model\":\"stub-model\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    static final String STREAM = "{\"model\":\"stub-model\",\"stream\":true,\"messages\":[{\"role\":\"user\","
            + "\"content\":\"hi\"}]}";

    private WebTestClient.ResponseSpec post(String key, String body) {
        WebTestClient.RequestBodySpec spec = client.post().uri("/v1/chat/completions")
                .contentType(MediaType.APPLICATION_JSON);
        if (key != null) {
            spec = spec.header("Authorization", "Bearer " + key);
        }
        return spec.bodyValue(body).exchange();
    }

    private static void assertOpenAiError(WebTestClient.ResponseSpec response, int status, String code) {
        response.expectStatus().isEqualTo(status)
                .expectHeader().contentType(MediaType.APPLICATION_JSON)
                .expectBody()
                .jsonPath("$.error.message").isNotEmpty()
                .jsonPath("$.error.type").isNotEmpty()
                .jsonPath("$.error").value(error -> assertThat(((Map<?, ?>) error).keySet().stream().map(String::valueOf).toList()).containsExactlyInAnyOrder(
                        "message", "type", "param", "code"))
                .jsonPath("$.error.code").isEqualTo(code);
    }

    @Test
    void missingOrWrongKeyIs401() {
        assertOpenAiError(post(null, CHAT), 401, "invalid_api_key");
        assertOpenAiError(post("sk-nope", CHAT), 401, "invalid_api_key");
        assertOpenAiError(post("internal-secret", CHAT), 401, "invalid_api_key");
    }

    @Test
    void unknownAndInternalPathsAre404() {
        assertOpenAiError(client.get().uri("/nope").header("Authorization", "Bearer sk-alice").exchange(), 404,
                "unknown_url");
        assertOpenAiError(client.get().uri("/__gateway/fallback/model-service").exchange(), 404, "unknown_url");
    }

    @Test
    void badBodiesAreRefusedAtTheEdge() {
        assertOpenAiError(post("sk-alice", "[1,2,3]"), 400, "invalid_body");
        assertOpenAiError(post("sk-alice", "{\"model\": "), 400, "invalid_json");
        String big = "{\"model\":\"stub-model\",\"messages\":[{\"role\":\"user\",\"content\":\"" + "x".repeat(4096)
                + "\"}]}";
        assertOpenAiError(post("sk-alice", big), 413, "request_too_large");
        assertOpenAiError(post("sk-restricted", CHAT), 403, "model_not_allowed");
    }

    @Test
    void forwardsTheCallersIdentityAndTheInternalKeyNeverTheCallersKey() {
        int before = GOOD.requests.size() + FLAKY.requests.size();
        client.post().uri("/v1/chat/completions").contentType(MediaType.APPLICATION_JSON)
                .header("Authorization", "Bearer sk-alice").header("X-Caller-Id", "mallory")
                .bodyValue(CHAT).exchange()
                .expectStatus().isOk()
                .expectBody().jsonPath("$.usage.total_tokens").isEqualTo(30);
        assertThat(GOOD.requests.size() + FLAKY.requests.size()).isEqualTo(before + 1);
        StubModelService.Recorded seen = StubModelService.newest(GOOD, FLAKY);
        assertThat(seen.headers().get("Authorization")).isEqualTo("Bearer internal-secret");
        assertThat(seen.headers().getAll("X-Caller-Id")).containsExactly("alice");
        assertThat(seen.headers().toString()).doesNotContain("sk-alice");
        assertThat(seen.body()).isEqualTo(CHAT);
    }

    /** Paths that routes would match once decoded or stripped of ';' parameters, while the edge saw another path. */
    @ParameterizedTest
    @ValueSource(strings = {"/%761/chat/completions", "/v1/%63hat/completions", "/v1;x/chat/completions",
            "/__gateway;x/via/model-service", "/%5f_gateway/via/model-service", "/__gateway/via/model-service",
            "/v1//chat/completions", "/v1/./chat/completions", "/x/../v1/chat/completions",
            "/v1/../__gateway/via/model-service"})
    void encodedOrUnnormalisedPathsNeverReachAPod(String path) {
        int before = GOOD.requests.size() + FLAKY.requests.size();
        WebTestClient.ResponseSpec response = client.post().uri(URI.create("http://127.0.0.1:" + port + path))
                .contentType(MediaType.APPLICATION_JSON)
                .header("Authorization", "Bearer sk-bogus").header("X-Caller-Id", "admin")
                .bodyValue(CHAT).exchange();
        response.expectStatus().value(status -> assertThat(status).isIn(400, 401, 404));
        assertThat(GOOD.requests.size() + FLAKY.requests.size()).isEqualTo(before);
    }

    @Test
    void neverSendsAnythingOutsideTheAllowedNetworks() {
        for (int i = 0; i < 8; i++) {
            post("sk-alice", i % 2 == 0 ? CHAT : STREAM).expectStatus().isOk();
        }
        assertThat(INTRUDER.requests).isEmpty();
        assertThat(meters.counter("llm_gateway_upstream_refused").count()).isGreaterThan(0);
    }

    @Test
    void hidesTheUpstreamServerHeader() {
        post("sk-alice", CHAT).expectStatus().isOk().expectHeader().doesNotExist("server");
    }

    /** A plain 500 is about the request, not the pod: not retried, not counted by the pod's breaker. */
    @Test
    void aPlain500IsNeitherRetriedNorCountedAsAPodFailure() {
        breakers.forInstance(InstanceBreakers.key("127.0.0.1", FLAKY.port())).reset();
        FLAKY.failWith = 500;
        int flakyBefore = FLAKY.requests.size();
        int errors = 0;
        try {
            for (int i = 0; i < 12; i++) {
                int status = post("sk-alice", CHAT).returnResult(String.class).getStatus().value();
                assertThat(status).isIn(200, 500);
                errors += status == 500 ? 1 : 0;
            }
        } finally {
            FLAKY.failWith = 0;
        }
        int flakyRequests = FLAKY.requests.size() - flakyBefore;
        assertThat(flakyRequests).isGreaterThanOrEqualTo(4);
        assertThat(errors).isEqualTo(flakyRequests);  // each 500 reached the client once: no retry
        assertThat(breakers.forInstance(InstanceBreakers.key("127.0.0.1", FLAKY.port())).getState())
                .isEqualTo(CircuitBreaker.State.CLOSED);
    }

    @Test
    void aParallelBurstServesAtMostTheBudgetAndOneRequest() throws Exception {
        String body = CHAT.replace("\"messages\"", "\"max_tokens\":10,\"messages\"");
        ExecutorService pool = Executors.newFixedThreadPool(20);
        List<Future<Integer>> statuses = new ArrayList<>();
        WebClient web = WebClient.create("http://127.0.0.1:" + port);
        for (int i = 0; i < 20; i++) {
            statuses.add(pool.submit(() -> web.post().uri("/v1/chat/completions")
                    .contentType(MediaType.APPLICATION_JSON).header("Authorization", "Bearer sk-burst")
                    .bodyValue(body).exchangeToMono(r -> r.releaseBody().thenReturn(r.statusCode().value()))
                    .block(Duration.ofSeconds(30))));
        }
        int served = 0;
        for (var status : statuses) {
            int s = status.get();
            assertThat(s).isIn(200, 429);
            served += s == 200 ? 1 : 0;
        }
        pool.shutdown();
        // each answer uses 30 tokens; the reservation is ceil(body bytes / 4) + 10 = 33; 300 admit 10 at most
        assertThat(served).isGreaterThanOrEqualTo(1);
        assertThat(served * 30).isLessThanOrEqualTo(300 + 30 + 5);  // + one request, + a few seconds of refill
    }

    @Test
    void aClientThatLeavesAStreamIsChargedItsPrompt() {
        String prompt = "word ".repeat(300);
        String body = STREAM.replace("\"content\":\"hi\"", "\"content\":\"" + prompt + "\"");
        List<String> first = WebClient.create("http://127.0.0.1:" + port).post()
                .uri("/v1/chat/completions").contentType(MediaType.APPLICATION_JSON)
                .header("Authorization", "Bearer sk-leaver").bodyValue(body)
                .retrieve().bodyToFlux(new ParameterizedTypeReference<ServerSentEvent<String>>() { })
                .map(ServerSentEvent::data).take(1).collectList().block(Duration.ofSeconds(20));
        assertThat(first).hasSize(1);
        long estimate = (body.length() + 3) / 4;
        long deadline = System.nanoTime() + Duration.ofSeconds(10).toNanos();
        double billed = 0;
        while (System.nanoTime() < deadline) {
            var counter = meters.find("llm_gateway_tokens").tag("caller", "leaver").tag("kind", "prompt").counter();
            billed = counter == null ? 0 : counter.count();
            if (billed > 0) {
                break;
            }
            Thread.onSpinWait();
        }
        assertThat(billed).isEqualTo((double) estimate);
    }

    @Test
    void streamsEventsAsTheyComeAndHidesTheUsageItAskedFor() {
        List<Long> arrivals = new ArrayList<>();
        long start = System.nanoTime();
        List<ServerSentEvent<String>> events = WebClient.create("http://127.0.0.1:" + port).post()
                .uri("/v1/chat/completions").contentType(MediaType.APPLICATION_JSON)
                .header("Authorization", "Bearer sk-alice").bodyValue(STREAM)
                .retrieve().bodyToFlux(new ParameterizedTypeReference<ServerSentEvent<String>>() { })
                .doOnNext(e -> arrivals.add((System.nanoTime() - start) / 1_000_000))
                .collectList().block(Duration.ofSeconds(20));
        assertThat(events).isNotNull();
        List<String> data = events.stream().map(ServerSentEvent::data).toList();
        assertThat(data.get(data.size() - 1)).isEqualTo("[DONE]");
        assertThat(data).noneMatch(d -> d.contains("\"choices\":[]"));
        assertThat(data).hasSize(7);  // 5 tokens, the finish chunk, [DONE]
        // tokens are 150 ms apart upstream: they must reach the client spread out, not at once
        assertThat(arrivals.get(4) - arrivals.get(0)).isGreaterThan(400);
        // the upstream was asked for usage (the gateway counts the tokens)
        StubModelService.Recorded upstream = StubModelService.newest(GOOD, FLAKY);
        assertThat(upstream.body()).contains("\"include_usage\":true");
    }

    @Test
    void streamKeepsTheUsageWhenTheClientAskedForIt() {
        String body = STREAM.replace("\"stream\":true", "\"stream\":true,\"stream_options\":{\"include_usage\":true}");
        List<String> data = WebClient.create("http://127.0.0.1:" + port).post()
                .uri("/v1/chat/completions").contentType(MediaType.APPLICATION_JSON)
                .header("Authorization", "Bearer sk-alice").bodyValue(body)
                .retrieve().bodyToFlux(new ParameterizedTypeReference<ServerSentEvent<String>>() { })
                .map(ServerSentEvent::data).collectList().block(Duration.ofSeconds(20));
        assertThat(data).anyMatch(d -> d.contains("\"total_tokens\":30"));
    }

    @Test
    void tokenBudgetIsDebitedWithRealUsageThen429() {
        post("sk-tiny", CHAT).expectStatus().isOk();  // admitted with 10 left, uses 30
        WebTestClient.ResponseSpec refused = post("sk-tiny", CHAT);
        refused.expectHeader().exists("Retry-After");
        assertOpenAiError(refused, 429, "rate_limit_exceeded");
        post("sk-tiny", CHAT).expectBody().jsonPath("$.error.type").isEqualTo("tokens");
    }

    /** 503: a failing (or draining) pod; 429: a pod whose batch and queue are full. Both are worth another pod. */
    @ParameterizedTest
    @ValueSource(ints = {503, 429})
    void retriesConnectFailuresAndRefusalsOnAnotherInstance(int refusal) {
        // a previous case's 503s may have opened the flaky pod's breaker: then it would not even be tried
        breakers.forInstance(InstanceBreakers.key("127.0.0.1", FLAKY.port())).reset();
        FLAKY.failWith = refusal;
        int flakyBefore = FLAKY.requests.size();
        try {
            for (int i = 0; i < 8; i++) {
                post("sk-alice", i % 2 == 0 ? CHAT : STREAM).expectStatus().isOk();
            }
        } finally {
            FLAKY.failWith = 0;
        }
        // the flaky instance was tried (and refused) at least once, yet every request succeeded
        assertThat(FLAKY.requests.size()).isGreaterThan(flakyBefore);
    }

    @Test
    void noInstanceAnswersIs503InOpenAiShape() {
        WebTestClient.ResponseSpec response = post("sk-alice", CHAT.replace("stub-model", "down-model"));
        response.expectHeader().exists("Retry-After");
        assertOpenAiError(response, 503, "service_unavailable");
    }

    @Test
    void aDownModelFallsBackToAnotherModelsRoute() {
        post("sk-alice", CHAT.replace("stub-model", "fb-model"))
                .expectStatus().isOk()
                .expectBody().jsonPath("$.model").isEqualTo("stub-model");
    }

    @Test
    void exposesPrometheusMetricsOnTheManagementPortOnly() {
        post("sk-alice", CHAT).expectStatus().isOk();
        WebTestClient management = WebTestClient.bindToServer().baseUrl("http://127.0.0.1:" + managementPort).build();
        String metrics = management.get().uri("/actuator/prometheus").exchange().expectStatus().isOk()
                .expectBody(String.class).returnResult().getResponseBody();
        assertThat(metrics).contains("llm_gateway_tokens_total{").contains("resilience4j_circuitbreaker_state");
        management.get().uri("/actuator/health").exchange().expectStatus().isOk();
        client.get().uri("/actuator/prometheus").exchange().expectStatus().isNotFound();
        client.get().uri("/actuator/health").exchange().expectStatus().isNotFound();
    }

    static int freePort() {
        try (ServerSocket socket = new ServerSocket(0)) {
            return socket.getLocalPort();
        } catch (IOException e) {
            throw new IllegalStateException(e);
        }
    }

    /** The breakers are tuned by resilience4j.* in application.yml (no rebuild): routes, pods and time limit. */
    @Test
    void breakersAreTunedByResilience4jProperties() {
        CircuitBreakerConfig routeDefault = routeBreakers.getCircuitBreakerRegistry().getDefaultConfig();
        assertThat(routeDefault.getSlidingWindowSize()).isEqualTo(10);
        assertThat(routeDefault.getMinimumNumberOfCalls()).isEqualTo(4);
        assertThat(routeDefault.getFailureRateThreshold()).isEqualTo(50f);
        assertThat(timeLimiters.getDefaultConfig().getTimeoutDuration()).isEqualTo(Duration.ofSeconds(930));
        // a route's own block, used by the breaker its requests go through
        post("sk-alice", CHAT.replace("stub-model", "down-model")).expectStatus().isEqualTo(503);
        assertThat(routeBreakers.getCircuitBreakerRegistry().circuitBreaker("down").getCircuitBreakerConfig()
                .getWaitIntervalFunctionInOpenState().apply(1)).isEqualTo(16_000L);
        assertThat(routeBreakers.getCircuitBreakerRegistry().circuitBreaker("model-service").getCircuitBreakerConfig()
                .getWaitIntervalFunctionInOpenState().apply(1)).isEqualTo(15_000L);
        // the per-pod breakers: configs.instance on top of configs.default
        CircuitBreakerConfig pod = breakers.forInstance("203.0.113.9:1").getCircuitBreakerConfig();
        assertThat(pod.getPermittedNumberOfCallsInHalfOpenState()).isEqualTo(2);
        assertThat(pod.getSlidingWindowSize()).isEqualTo(10);
        assertThat(pod.isAutomaticTransitionFromOpenToHalfOpenEnabled()).isTrue();
    }
}
