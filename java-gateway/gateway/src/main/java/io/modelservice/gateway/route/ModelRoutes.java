package io.modelservice.gateway.route;

import java.io.IOException;
import java.time.Duration;
import java.util.HashSet;
import java.util.List;
import java.util.Set;
import java.util.concurrent.TimeoutException;
import java.util.stream.Stream;

import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import io.github.resilience4j.circuitbreaker.CircuitBreakerConfig;
import io.github.resilience4j.timelimiter.TimeLimiterConfig;
import io.modelservice.gateway.config.GatewayProperties;
import io.modelservice.gateway.config.GatewayProperties.ModelRoute;
import io.modelservice.gateway.web.EdgeFilter;
import io.modelservice.gateway.web.GatewayAttributes;
import org.springframework.cloud.circuitbreaker.resilience4j.ReactiveResilience4JCircuitBreakerFactory;
import org.springframework.cloud.circuitbreaker.resilience4j.Resilience4JConfigBuilder;
import org.springframework.cloud.client.circuitbreaker.Customizer;
import org.springframework.cloud.gateway.filter.GatewayFilter;
import org.springframework.cloud.gateway.route.RouteLocator;
import org.springframework.cloud.gateway.route.builder.GatewayFilterSpec;
import org.springframework.cloud.gateway.route.builder.RouteLocatorBuilder;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.http.HttpMethod;
import org.springframework.http.HttpStatus;
import org.springframework.http.server.reactive.ServerHttpRequest;

import static org.springframework.cloud.gateway.support.RouteMetadataUtils.CONNECT_TIMEOUT_ATTR;
import static org.springframework.cloud.gateway.support.RouteMetadataUtils.RESPONSE_TIMEOUT_ATTR;

/**
 * The routes, from {@code llm-gateway.routes}: {@code /v1/** -> lb://<service>} (instances from Nacos), each with
 * a circuit breaker (fallback: an OpenAI-shaped 503, or another model's route) and retries on another instance
 * of what {@code llm-gateway.resilience} lists (connect errors, 502/503/504, a pod's 429).
 * Routes that list models take the requests for those models; a route without models takes the rest.
 */
@Configuration(proxyBeanMethods = false)
public class ModelRoutes {

    public static final String VIA = EdgeFilter.INTERNAL_PREFIX + "via/";
    public static final String FALLBACK = EdgeFilter.INTERNAL_PREFIX + "fallback/";

    private static final ObjectMapper JSON = new ObjectMapper();

    @Bean
    public RouteLocator modelRouteLocator(RouteLocatorBuilder builder, GatewayProperties properties) {
        RouteLocatorBuilder.Builder routes = builder.routes();
        List<ModelRoute> configured = properties.getRoutes();
        Set<String> ids = new HashSet<>();
        for (ModelRoute route : configured) {
            if (!ids.add(route.getId())) {
                throw new IllegalStateException("duplicate llm-gateway.routes id: " + route.getId());
            }
        }
        for (ModelRoute route : configured) {
            if (!route.getFallbackRoute().isBlank() && !ids.contains(route.getFallbackRoute())) {
                throw new IllegalStateException("route " + route.getId() + " falls back to unknown route "
                        + route.getFallbackRoute());
            }
        }
        for (int i = 0; i < configured.size(); i++) {
            ModelRoute route = configured.get(i);
            Set<String> models = Set.copyOf(route.getModels());
            int order = models.isEmpty() ? 1000 + i : i;
            String fallbackUri = route.getFallbackRoute().isBlank()
                    ? "forward:" + FALLBACK + route.getId()
                    : "forward:" + VIA + route.getFallbackRoute();
            routes.route(route.getId(), r -> r.order(order)
                    .path("/v1/**").and()
                    .predicate(exchange -> models.isEmpty()
                            || models.contains(exchange.<String>getAttribute(GatewayAttributes.MODEL)))
                    .filters(f -> resilience(f.filter(rememberFallbackModel(route)), route, fallbackUri,
                            properties.getResilience()))
                    .metadata(RESPONSE_TIMEOUT_ATTR, route.getResponseTimeout().toMillis())
                    .metadata(CONNECT_TIMEOUT_ATTR, (int) route.getConnectTimeout().toMillis())
                    .uri("lb://" + route.getService()));
            // The same service, reached as another route's fallback (internal path, never from outside).
            routes.route(route.getId() + "-as-fallback", r -> r.order(order)
                    .path(VIA + route.getId())
                    .filters(f -> resilience(f.filter(asFallback(route)), route, "forward:" + FALLBACK + route.getId(),
                            properties.getResilience()))
                    .metadata(RESPONSE_TIMEOUT_ATTR, route.getResponseTimeout().toMillis())
                    .metadata(CONNECT_TIMEOUT_ATTR, (int) route.getConnectTimeout().toMillis())
                    .uri("lb://" + route.getService()));
        }
        return routes.build();
    }

    private static GatewayFilterSpec resilience(GatewayFilterSpec f, ModelRoute route, String fallbackUri,
                                                GatewayProperties.Resilience resilience) {
        GatewayFilterSpec spec = f.circuitBreaker(c -> c.setName(route.getId()).setFallbackUri(fallbackUri));
        if (resilience.getRetries() > 0) {
            Duration first = resilience.getRetryBackoff();
            // Only what says "this pod cannot take it now" is worth another pod: connect errors, the failure
            // statuses (502/503/504) and the refusal statuses (a pod's 429, answered before any work when its batch
            // and queue are full; the load balancer prefers untried pods). Never a plain 500 or another 4xx: those
            // are about the request, and retrying them multiplies one bad request. The client sees the last answer.
            HttpStatus[] statuses = Stream.concat(resilience.getFailureStatuses().stream(),
                    resilience.getRefusalStatuses().stream()).distinct().map(HttpStatus::valueOf)
                    .toArray(HttpStatus[]::new);
            HttpMethod[] methods = resilience.getRetryMethods().stream().map(HttpMethod::valueOf)
                    .toArray(HttpMethod[]::new);
            spec = spec.retry(c -> c.setRetries(resilience.getRetries())
                    .setMethods(methods)
                    .setSeries()
                    .setStatuses(statuses)
                    .setExceptions(IOException.class, TimeoutException.class)
                    .setBackoff(first, first.multipliedBy(10), 2, false));
        }
        return spec;
    }

    /** Notes the model name the fallback route should be asked for, if this route has one. */
    private static GatewayFilter rememberFallbackModel(ModelRoute route) {
        return (exchange, chain) -> {
            if (!route.getFallbackModel().isBlank()) {
                exchange.getAttributes().put(GatewayAttributes.FALLBACK_MODEL, route.getFallbackModel());
            }
            return chain.filter(exchange);
        };
    }

    /** Restores the client's path and, when the failed route says so, the fallback's model name in the body. */
    private static GatewayFilter asFallback(ModelRoute route) {
        return (exchange, chain) -> {
            String path = exchange.getAttributeOrDefault(GatewayAttributes.ORIGINAL_PATH, "/v1/chat/completions");
            byte[] body = exchange.getAttribute(GatewayAttributes.BODY);
            String model = exchange.getAttribute(GatewayAttributes.FALLBACK_MODEL);
            if (body != null && model != null) {
                try {
                    ObjectNode node = (ObjectNode) JSON.readTree(body);
                    node.put("model", model);
                    body = JSON.writeValueAsBytes(node);
                } catch (Exception e) {
                    return chain.filter(exchange);
                }
            }
            byte[] forwarded = body;
            exchange.getAttributes().put(GatewayAttributes.FALLBACK_ROUTE, route.getId());
            ServerHttpRequest request = exchange.getRequest().mutate().path(path).headers(h -> {
                if (forwarded != null) {
                    h.setContentLength(forwarded.length);
                }
            }).build();
            return chain.filter(exchange.mutate().request(EdgeFilter.withBody(request, forwarded)).build());
        };
    }

    /**
     * The route circuit breakers. A route's breaker covers the attempts until the response headers (a stream's
     * body is written after it), so its time limit only has to exceed the retries' response timeouts.
     */
    @Bean
    public Customizer<ReactiveResilience4JCircuitBreakerFactory> routeBreakers(GatewayProperties properties) {
        GatewayProperties.Resilience r = properties.getResilience();
        Duration longest = properties.getRoutes().stream().map(ModelRoute::getResponseTimeout)
                .max(Duration::compareTo).orElse(Duration.ofMinutes(5));
        Duration limit = longest.multipliedBy(r.getRetries() + 1L).plusSeconds(30);
        return factory -> factory.configureDefault(id -> new Resilience4JConfigBuilder(id)
                .circuitBreakerConfig(CircuitBreakerConfig.custom()
                        .failureRateThreshold(r.getFailureRateThreshold())
                        .slidingWindowSize(r.getSlidingWindowSize())
                        .minimumNumberOfCalls(r.getMinimumNumberOfCalls())
                        .waitDurationInOpenState(r.getOpenStateWait())
                        .automaticTransitionFromOpenToHalfOpenEnabled(true)
                        .build())
                .timeLimiterConfig(TimeLimiterConfig.custom().timeoutDuration(limit).build())
                .build());
    }
}
