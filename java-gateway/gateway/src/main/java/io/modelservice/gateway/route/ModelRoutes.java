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
import io.github.resilience4j.timelimiter.TimeLimiter;
import io.github.resilience4j.timelimiter.TimeLimiterRegistry;
import io.modelservice.gateway.config.GatewayProperties;
import io.modelservice.gateway.config.GatewayProperties.ModelRoute;
import io.modelservice.gateway.web.InternalPathFilter;
import io.modelservice.gateway.web.ReplayableBody;
import io.modelservice.gateway.web.GatewayAttributes;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.boot.ApplicationRunner;
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
 * a circuit breaker (tuned by {@code resilience4j.circuitbreaker.*}; fallback: an OpenAI-shaped 503, or another
 * model's route) and retries on another instance of what {@code llm-gateway.resilience} lists (connect errors,
 * 502/503/504, a pod's 429).
 * Routes that list models take the requests for those models; a route without models takes the rest.
 */
@Configuration(proxyBeanMethods = false)
public class ModelRoutes {

    public static final String VIA = InternalPathFilter.INTERNAL_PREFIX + "via/";
    public static final String FALLBACK = InternalPathFilter.INTERNAL_PREFIX + "fallback/";

    private static final Logger log = LoggerFactory.getLogger(ModelRoutes.class);

    @Bean
    public RouteLocator modelRouteLocator(RouteLocatorBuilder builder, GatewayProperties properties,
                                          ObjectMapper json) {
        RouteLocatorBuilder.Builder routes = builder.routes();
        List<ModelRoute> configured = properties.routes();
        Set<String> ids = new HashSet<>();
        for (ModelRoute route : configured) {
            if (!ids.add(route.id())) {
                throw new IllegalStateException("duplicate llm-gateway.routes id: " + route.id());
            }
        }
        for (ModelRoute route : configured) {
            if (!route.fallbackRoute().isBlank() && !ids.contains(route.fallbackRoute())) {
                throw new IllegalStateException("route " + route.id() + " falls back to unknown route "
                        + route.fallbackRoute());
            }
        }
        for (int i = 0; i < configured.size(); i++) {
            ModelRoute route = configured.get(i);
            Set<String> models = Set.copyOf(route.models());
            int order = models.isEmpty() ? 1000 + i : i;
            String fallbackUri = route.fallbackRoute().isBlank()
                    ? "forward:" + FALLBACK + route.id()
                    : "forward:" + VIA + route.fallbackRoute();
            routes.route(route.id(), r -> r.order(order)
                    .path("/v1/**").and()
                    .predicate(exchange -> models.isEmpty()
                            || models.contains(exchange.<String>getAttribute(GatewayAttributes.MODEL)))
                    .filters(f -> resilience(f.filter(rememberFallbackModel(route)), route, fallbackUri,
                            properties.resilience()))
                    .metadata(RESPONSE_TIMEOUT_ATTR, route.responseTimeout().toMillis())
                    .metadata(CONNECT_TIMEOUT_ATTR, (int) route.connectTimeout().toMillis())
                    .uri("lb://" + route.service()));
            // The same service, reached as another route's fallback (internal path, never from outside).
            routes.route(route.id() + "-as-fallback", r -> r.order(order)
                    .path(VIA + route.id())
                    .filters(f -> resilience(f.filter(asFallback(route, json)), route,
                            "forward:" + FALLBACK + route.id(), properties.resilience()))
                    .metadata(RESPONSE_TIMEOUT_ATTR, route.responseTimeout().toMillis())
                    .metadata(CONNECT_TIMEOUT_ATTR, (int) route.connectTimeout().toMillis())
                    .uri("lb://" + route.service()));
        }
        return routes.build();
    }

    private static GatewayFilterSpec resilience(GatewayFilterSpec f, ModelRoute route, String fallbackUri,
                                                GatewayProperties.Resilience resilience) {
        GatewayFilterSpec spec = f.circuitBreaker(c -> c.setName(route.id()).setFallbackUri(fallbackUri));
        if (resilience.retries() > 0) {
            Duration first = resilience.retryBackoff();
            // Only what says "this pod cannot take it now" is worth another pod: connect errors, the failure
            // statuses (502/503/504) and the refusal statuses (a pod's 429, answered before any work when its batch
            // and queue are full; the load balancer prefers untried pods). Never a plain 500 or another 4xx: those
            // are about the request, and retrying them multiplies one bad request. The client sees the last answer.
            HttpStatus[] statuses = Stream.concat(resilience.failureStatuses().stream(),
                    resilience.refusalStatuses().stream()).distinct().map(HttpStatus::valueOf)
                    .toArray(HttpStatus[]::new);
            HttpMethod[] methods = resilience.retryMethods().stream().map(HttpMethod::valueOf)
                    .toArray(HttpMethod[]::new);
            spec = spec.retry(c -> c.setRetries(resilience.retries())
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
            if (!route.fallbackModel().isBlank()) {
                exchange.getAttributes().put(GatewayAttributes.FALLBACK_MODEL, route.fallbackModel());
            }
            return chain.filter(exchange);
        };
    }

    /** Restores the client's path and, when the failed route says so, the fallback's model name in the body. */
    private static GatewayFilter asFallback(ModelRoute route, ObjectMapper json) {
        return (exchange, chain) -> {
            String path = exchange.getAttributeOrDefault(GatewayAttributes.ORIGINAL_PATH, "/v1/chat/completions");
            byte[] body = exchange.getAttribute(GatewayAttributes.BODY);
            String model = exchange.getAttribute(GatewayAttributes.FALLBACK_MODEL);
            if (body != null && model != null) {
                try {
                    ObjectNode node = (ObjectNode) json.readTree(body);
                    node.put("model", model);
                    body = json.writeValueAsBytes(node);
                } catch (Exception e) {
                    return chain.filter(exchange);
                }
            }
            byte[] forwarded = body;
            exchange.getAttributes().put(GatewayAttributes.FALLBACK_ROUTE, route.id());
            ServerHttpRequest request = exchange.getRequest().mutate().path(path).headers(h -> {
                if (forwarded != null) {
                    h.setContentLength(forwarded.length);
                }
            }).build();
            return chain.filter(exchange.mutate().request(ReplayableBody.of(request, forwarded)).build());
        };
    }

    /**
     * The route breakers' time limit ({@code resilience4j.timelimiter.configs.default.timeout-duration}, or a route's
     * own {@code resilience4j.timelimiter.instances.<route id>}) covers every
     * attempt until the response headers: shorter than the attempts' response timeouts, it would cut a slow
     * non-streamed generation into a 504. Said at startup, not discovered under load.
     */
    @Bean
    public ApplicationRunner routeTimeLimitCheck(TimeLimiterRegistry timeLimiters, GatewayProperties properties) {
        return args -> {
            Duration longest = properties.routes().stream().map(ModelRoute::responseTimeout)
                    .max(Duration::compareTo).orElse(Duration.ZERO);
            Duration needed = longest.multipliedBy(properties.resilience().retries() + 1L);
            for (ModelRoute route : properties.routes()) {
                // the one Spring Cloud CircuitBreaker uses: the route's own instance (timelimiter.instances.<id>),
                // else configs.<id>, else configs.default
                Duration limit = timeLimiters.find(route.id()).map(TimeLimiter::getTimeLimiterConfig)
                        .or(() -> timeLimiters.getConfiguration(route.id()))
                        .orElseGet(timeLimiters::getDefaultConfig).getTimeoutDuration();
                if (limit.compareTo(needed) < 0) {
                    log.warn("route {}: resilience4j time limit {} is shorter than (retries + 1) x response-timeout"
                            + " = {}; slow answers will end as 504", route.id(), limit, needed);
                }
            }
        };
    }
}
