package io.modelservice.gateway.route;

import java.time.Duration;

import org.springframework.boot.context.properties.ConfigurationProperties;
import org.springframework.boot.context.properties.bind.DefaultValue;

/**
 * How the gateway picks a model-service instance ({@code llm-gateway.load-balancer.*}); see {@link PodLoads}.
 *
 * @param strategy       {@code least-loaded}: the instance with the fewest requests running + waiting (the pods'
 *                       own gauges, scraped) plus those this gateway sent since; {@code round-robin}: in turn.
 * @param scrapeInterval pause between two scrapes of one pod's metrics (off the request path).
 * @param scrapeTimeout  longest wait for one scrape; a pod that does not answer keeps being routed to, on stale
 *                       numbers until they expire.
 * @param staleAfter     numbers older than this are not used; with none fresh the choice is round robin.
 * @param metricsPath    the pods' Prometheus endpoint (model_service_num_requests_running / _waiting).
 * @param skipFull       skip pods whose batch and queue are full (their metadata max_running_requests +
 *                       max_waiting_requests), unless every pod is.
 * @param forgetAfter    a pod not listed by discovery for this long is no longer scraped.
 */
@ConfigurationProperties(prefix = "llm-gateway.load-balancer")
public record LoadBalancerProperties(
        @DefaultValue("least-loaded") Strategy strategy,
        @DefaultValue("500ms") Duration scrapeInterval,
        @DefaultValue("400ms") Duration scrapeTimeout,
        @DefaultValue("2s") Duration staleAfter,
        @DefaultValue("/metrics") String metricsPath,
        @DefaultValue("true") boolean skipFull,
        @DefaultValue("60s") Duration forgetAfter) {

    public enum Strategy { LEAST_LOADED, ROUND_ROBIN }
}
