package io.modelservice.gateway;

import java.net.ServerSocket;
import java.time.Duration;

import io.micrometer.core.instrument.Gauge;
import io.micrometer.core.instrument.MeterRegistry;
import io.modelservice.gateway.auth.Authenticator;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.Test;
import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.boot.test.autoconfigure.actuate.observability.AutoConfigureObservability;
import org.springframework.boot.test.context.SpringBootTest;
import org.springframework.http.MediaType;
import org.springframework.test.context.DynamicPropertyRegistry;
import org.springframework.test.context.DynamicPropertySource;
import org.springframework.test.web.reactive.server.WebTestClient;

import static org.assertj.core.api.Assertions.assertThat;

/**
 * Least-loaded routing through the whole gateway, against stub pods that publish the model service's gauges on
 * {@code /metrics}: a busy pod is avoided, a full one skipped, one whose metrics endpoint hangs still serves, and a
 * dead one (nothing listening) gets no answer through. The stubs' numbers are scraped for real.
 */
@AutoConfigureObservability
@SpringBootTest(webEnvironment = SpringBootTest.WebEnvironment.RANDOM_PORT)
class LoadAwareRoutingIntegrationTest {

    static final StubModelService BUSY = StubModelService.start("busy");
    static final StubModelService IDLE = StubModelService.start("idle");
    static final StubModelService FULL = StubModelService.start("full");
    static final StubModelService SILENT = StubModelService.start("silent");
    static final int DEAD_PORT = freePort();

    static {
        BUSY.load(3, 0);
        IDLE.load(0, 0);
        FULL.load(4, 2);  // its capacity (metadata below) is 4 running + 2 waiting: the next one would get 429
        SILENT.metricsHang = true;
    }

    @DynamicPropertySource
    static void properties(DynamicPropertyRegistry r) {
        r.add("spring.cloud.nacos.discovery.enabled", () -> "false");
        r.add("spring.cloud.service-registry.auto-registration.enabled", () -> "false");
        String simple = "spring.cloud.discovery.client.simple.instances.";
        r.add(simple + "busy-idle[0].uri", BUSY::url);
        r.add(simple + "busy-idle[1].uri", IDLE::url);
        r.add(simple + "full-silent-dead[0].uri", FULL::url);
        r.add(simple + "full-silent-dead[0].metadata.max_running_requests", () -> "4");
        r.add(simple + "full-silent-dead[0].metadata.max_waiting_requests", () -> "2");
        r.add(simple + "full-silent-dead[1].uri", SILENT::url);
        r.add(simple + "full-silent-dead[2].uri", () -> "http://127.0.0.1:" + DEAD_PORT);
        r.add("llm-gateway.upstream.allowed-networks", () -> "127.0.0.1/32");
        r.add("llm-gateway.routes[0].id", () -> "busy-idle");
        r.add("llm-gateway.routes[0].service", () -> "busy-idle");
        r.add("llm-gateway.routes[0].models[0]", () -> "m1");
        r.add("llm-gateway.routes[1].id", () -> "full-silent-dead");
        r.add("llm-gateway.routes[1].service", () -> "full-silent-dead");
        r.add("llm-gateway.routes[1].models[0]", () -> "m2");
        r.add("llm-gateway.load-balancer.scrape-interval", () -> "100ms");
        r.add("llm-gateway.load-balancer.scrape-timeout", () -> "300ms");
        r.add("llm-gateway.load-balancer.stale-after", () -> "10s");
        String p = "llm-gateway.api-keys[0].";
        r.add(p + "name", () -> "alice");
        r.add(p + "sha256", () -> Authenticator.sha256Hex("sk-alice"));
        r.add(p + "requests-per-minute", () -> 0);
        r.add(p + "tokens-per-minute", () -> 0);
    }

    @AfterAll
    static void stopStubs() {
        for (StubModelService stub : new StubModelService[] {BUSY, IDLE, FULL, SILENT}) {
            stub.close();
        }
    }

    @Autowired
    WebTestClient client;

    @Autowired
    MeterRegistry meters;

    int post(String model) {
        return client.mutate().responseTimeout(Duration.ofSeconds(30)).build()
                .post().uri("/v1/chat/completions")
                .header("Authorization", "Bearer sk-alice").contentType(MediaType.APPLICATION_JSON)
                .bodyValue("{\"model\":\"" + model + "\",\"max_tokens\":4,\"messages\":[{\"role\":\"user\","
                        + "\"content\":\"hi\"}]}")
                .exchange().returnResult(String.class).getStatus().value();
    }

    /** Waits until the gateway has scraped this stub's numbers (its running gauge shows them). */
    void awaitScraped(StubModelService stub, double running) throws InterruptedException {
        long deadline = System.nanoTime() + Duration.ofSeconds(20).toNanos();
        while (System.nanoTime() < deadline) {
            Gauge gauge = meters.find("llm_gateway_instance_load").tags("instance", "127.0.0.1:" + stub.port(),
                    "kind", "running").gauge();
            if (gauge != null && gauge.value() == running) {
                return;
            }
            Thread.sleep(50);
        }
        throw new AssertionError("the gateway did not scrape " + stub.name + " in 20 s");
    }

    @Test
    void newRequestsGoToTheIdlePodNotTheBusyOne() throws Exception {
        assertThat(post("m1")).isEqualTo(200);      // the first request lists the pods for scraping
        awaitScraped(BUSY, 3);
        awaitScraped(IDLE, 0);
        BUSY.requests.clear();
        IDLE.requests.clear();
        for (int i = 0; i < 8; i++) {
            assertThat(post("m1")).isEqualTo(200);
        }
        assertThat(IDLE.requests).hasSize(8);
        assertThat(BUSY.requests).isEmpty();
        assertThat(meters.get("llm_gateway_lb_picks").tags("instance", "127.0.0.1:" + IDLE.port(),
                "reason", "least_loaded").counter().count()).isGreaterThanOrEqualTo(8);
    }

    @Test
    void aFullPodIsSkippedAPodWithSilentMetricsStillServesADeadPodDoesNot() throws Exception {
        assertThat(post("m2")).isEqualTo(200);
        awaitScraped(FULL, 4);
        FULL.requests.clear();
        SILENT.requests.clear();
        for (int i = 0; i < 6; i++) {
            assertThat(post("m2")).isEqualTo(200);   // the dead pod's connect errors are retried on SILENT
        }
        assertThat(FULL.requests).isEmpty();
        assertThat(SILENT.requests).hasSize(6);
        Gauge silentRunning = meters.find("llm_gateway_instance_load")
                .tags("instance", "127.0.0.1:" + SILENT.port(), "kind", "running").gauge();
        assertThat(silentRunning).isNotNull();
        assertThat(silentRunning.value()).isNaN();  // never scraped: no numbers, still routed to
    }

    static int freePort() {
        try (ServerSocket socket = new ServerSocket(0)) {
            return socket.getLocalPort();
        } catch (java.io.IOException e) {
            throw new IllegalStateException(e);
        }
    }
}
