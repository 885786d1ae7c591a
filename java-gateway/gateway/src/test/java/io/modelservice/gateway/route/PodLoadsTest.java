package io.modelservice.gateway.route;

import java.net.URI;
import java.time.Duration;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.atomic.AtomicLong;

import io.micrometer.core.instrument.simple.SimpleMeterRegistry;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;
import org.springframework.cloud.client.DefaultServiceInstance;
import org.springframework.cloud.client.ServiceInstance;

import static org.assertj.core.api.Assertions.assertThat;

/** The least-loaded choice from given pod numbers (no scraping here: samples are set directly). */
class PodLoadsTest {

    static final long MS = 1_000_000L;

    final AtomicLong now = new AtomicLong(1_000_000 * MS);
    final SimpleMeterRegistry meters = new SimpleMeterRegistry();
    PodLoads loads = loads(LoadBalancerProperties.Strategy.LEAST_LOADED);

    PodLoads loads(LoadBalancerProperties.Strategy strategy) {
        return new PodLoads(new LoadBalancerProperties(strategy, Duration.ofMillis(500), Duration.ofMillis(400),
                Duration.ofSeconds(2), "/metrics", true, Duration.ofSeconds(60)), meters, now::get, false);
    }

    @AfterEach
    void close() {
        loads.destroy();
    }

    static ServiceInstance pod(int port, Integer maxRunning, Integer maxWaiting) {
        Map<String, String> metadata = new HashMap<>();
        if (maxRunning != null) {
            metadata.put("max_running_requests", maxRunning.toString());
            metadata.put("max_waiting_requests", maxWaiting.toString());
        }
        return new DefaultServiceInstance("p" + port, "model-service", "127.0.0.1", port, false, metadata);
    }

    final ServiceInstance a = pod(8001, 4, 2);
    final ServiceInstance b = pod(8002, 4, 2);
    final ServiceInstance c = pod(8003, 4, 2);

    void sample(ServiceInstance instance, double running, double waiting) {
        loads.listed(List.of(instance));
        PodLoads.Pod pod = podOf(instance);
        pod.sample = new PodLoads.Sample(running, waiting, now.get());
    }

    PodLoads.Pod podOf(ServiceInstance instance) {
        loads.listed(List.of(instance));
        try {
            var field = PodLoads.class.getDeclaredField("pods");
            field.setAccessible(true);
            @SuppressWarnings("unchecked")
            Map<String, PodLoads.Pod> pods = (Map<String, PodLoads.Pod>) field.get(loads);
            return pods.get(InstanceBreakers.key(instance));
        } catch (ReflectiveOperationException e) {
            throw new AssertionError(e);
        }
    }

    ServiceInstance pick(List<ServiceInstance> candidates, int turn) {
        return candidates.get(loads.choose(candidates, turn).index());
    }

    @Test
    void picksThePodWithTheFewestRunningAndWaitingRequests() {
        sample(a, 3, 1);
        sample(b, 1, 0);
        sample(c, 2, 0);
        for (int turn = 0; turn < 6; turn++) {
            assertThat(pick(List.of(a, b, c), turn)).isEqualTo(b);
        }
        assertThat(loads.choose(List.of(a, b, c), 0).reason()).isEqualTo("least_loaded");
        assertThat(meters.get("llm_gateway_instance_load").tags("instance", "127.0.0.1:8001", "kind", "score")
                .gauge().value()).isEqualTo(4.0);
        assertThat(meters.get("llm_gateway_lb_picks").tags("instance", "127.0.0.1:8002", "reason", "least_loaded")
                .counter().count()).isEqualTo(7.0);
    }

    @Test
    void addsTheAttemptsThisGatewayStartedSinceTheScrape() {
        sample(a, 1, 0);
        sample(b, 0, 0);
        PodLoads.Attempt first = loads.started(b);
        PodLoads.Attempt second = loads.started(b);   // b: 0 + 2 since the scrape, a: 1
        assertThat(pick(List.of(a, b), 0)).isEqualTo(a);
        loads.ended(first);
        loads.ended(second);
        assertThat(pick(List.of(a, b), 0)).isEqualTo(b);
        // attempts started before the scrape are already in the pod's numbers: not counted twice
        PodLoads.Attempt before = loads.started(b);
        now.addAndGet(10 * MS);
        sample(b, 1, 0);
        sample(a, 1, 0);
        assertThat(loads.choose(List.of(a, b), 0).index()).isEqualTo(0);  // a tie, broken by the turn
        assertThat(loads.choose(List.of(a, b), 1).index()).isEqualTo(1);
        loads.ended(before);
    }

    @Test
    void attemptsThatEndedSinceTheScrapeNoLongerCount() {
        PodLoads.Attempt stream = loads.started(a);    // a stream this gateway sent to a, running at the scrape
        now.addAndGet(10 * MS);
        sample(a, 1, 0);
        sample(b, 0, 0);
        assertThat(pick(List.of(a, b), 0)).isEqualTo(b);
        assertThat(pick(List.of(a, b), 1)).isEqualTo(b);
        loads.ended(stream);                           // it ended after the scrape: a is idle as far as we know
        assertThat(pick(List.of(a, b), 0)).isEqualTo(a);
        assertThat(pick(List.of(a, b), 1)).isEqualTo(b);
    }

    @Test
    void roundRobinWhileNoNumbersAreFresh() {
        assertThat(pick(List.of(a, b), 0)).isEqualTo(a);
        assertThat(pick(List.of(a, b), 1)).isEqualTo(b);
        assertThat(loads.choose(List.of(a, b), 1).reason()).isEqualTo("round_robin");
        sample(a, 5, 0);
        sample(b, 0, 0);
        now.addAndGet(2_001 * MS);  // older than stale-after
        assertThat(pick(List.of(a, b), 0)).isEqualTo(a);
        assertThat(pick(List.of(a, b), 1)).isEqualTo(b);
    }

    @Test
    void aPodWithoutFreshNumbersStaysRoutableScoredAsTheMeanPlusItsOwnAttempts() {
        ServiceInstance big1 = pod(8011, 32, 128);
        ServiceInstance big2 = pod(8012, 32, 128);
        ServiceInstance silent = pod(8013, 32, 128);
        sample(big1, 6, 0);
        sample(big2, 2, 0);
        loads.listed(List.of(silent));                  // its metrics never answered
        // the mean of the fresh candidates (6) for the silent one: a tie with big1, taken in turn
        assertThat(pick(List.of(big1, silent), 0)).isEqualTo(big1);
        assertThat(pick(List.of(big1, silent), 1)).isEqualTo(silent);
        PodLoads.Attempt sent = loads.started(silent);  // 6 + 1 in flight
        assertThat(pick(List.of(big1, silent), 0)).isEqualTo(big1);
        assertThat(pick(List.of(big1, silent), 1)).isEqualTo(big1);
        assertThat(pick(List.of(big1, big2, silent), 1)).isEqualTo(big2);  // mean 4 + 1 > 2
        loads.ended(sent);
    }

    @Test
    void skipsFullPodsUnlessAllAreFull() {
        sample(a, 4, 2);   // 4 running + 2 waiting = its 4 + 2 capacity: the next request would get 429
        sample(b, 4, 1);
        assertThat(pick(List.of(a, b), 0)).isEqualTo(b);
        PodLoads.Attempt sent = loads.started(b);      // b full too now
        PodLoads.Choice choice = loads.choose(List.of(a, b), 0);
        assertThat(choice.reason()).isEqualTo("all_full");
        loads.ended(sent);
    }

    @Test
    void thePodsCapacityComesFromItsNacosMetadata() {
        assertThat(PodLoads.capacity(Map.of("max_running_requests", "32", "max_waiting_requests", "128")))
                .isEqualTo(160);
        assertThat(PodLoads.capacity(Map.of("max_running_requests", "32"))).isEqualTo(-1);
        ServiceInstance unknown = pod(8009, null, null);
        sample(unknown, 1000, 1000);                    // no capacity registered: never considered full
        sample(a, 4, 2);
        assertThat(loads.choose(List.of(a, unknown), 0).reason()).isEqualTo("least_loaded");
        assertThat(pick(List.of(a, unknown), 0)).isEqualTo(unknown);
    }

    @Test
    void roundRobinStrategyIgnoresTheNumbers() {
        loads.destroy();
        loads = loads(LoadBalancerProperties.Strategy.ROUND_ROBIN);
        sample(a, 9, 9);
        sample(b, 0, 0);
        assertThat(pick(List.of(a, b), 0)).isEqualTo(a);
        assertThat(pick(List.of(a, b), 1)).isEqualTo(b);
    }

    @Test
    void parsesThePodsPrometheusPage() {
        String page = """
                # HELP model_service_num_requests_running Sequences in the running batch.
                # TYPE model_service_num_requests_running gauge
                model_service_num_requests_running{model_name="smollm2-135m-instruct"} 3.0
                # HELP model_service_num_requests_waiting Requests queued for admission to the batch.
                model_service_num_requests_waiting{model_name="smollm2-135m-instruct"} 2.0
                model_service_num_requests_running_other 99
                model_service_num_requests_waiting_created 1.7e9
                """;
        assertThat(PodLoads.parse(page)).containsExactly(3.0, 2.0);
        assertThat(PodLoads.parse("model_service_num_requests_running 1\n")).isNull();
        assertThat(PodLoads.parse("<html>not metrics</html>")).isNull();
    }

    @Test
    void metricsUrlIsThePodsOwnAddress() {
        loads.listed(List.of(a));
        assertThat(podOf(a).metrics).isEqualTo(URI.create("http://127.0.0.1:8001/metrics"));
    }
}
