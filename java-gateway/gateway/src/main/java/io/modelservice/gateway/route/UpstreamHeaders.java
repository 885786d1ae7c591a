package io.modelservice.gateway.route;

import java.net.URI;

import io.modelservice.gateway.auth.Caller;
import io.modelservice.gateway.config.GatewayProperties;
import io.modelservice.gateway.web.GatewayAttributes;
import org.springframework.cloud.gateway.filter.headers.HttpHeadersFilter;
import org.springframework.cloud.gateway.support.ServerWebExchangeUtils;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.core.Ordered;
import org.springframework.http.HttpHeaders;
import org.springframework.web.server.ServerWebExchange;

/**
 * The headers of every proxied request and answer, set at the last moment (Spring Cloud Gateway applies these
 * filters as it sends the request upstream and copies the answer back), so no route and no earlier filter can
 * forget them.
 */
@Configuration(proxyBeanMethods = false)
public class UpstreamHeaders {

    /**
     * Upstream gets the gateway's identity, never the client's: the client's {@code Authorization} and caller
     * header are always removed; the internal key and the authenticated caller's name are set, and only when the
     * target is an allowed upstream (the key never leaves for anywhere else).
     */
    @Bean
    public HttpHeadersFilter upstreamIdentity(GatewayProperties properties, UpstreamAllowlist allowlist) {
        return new OrderedHeadersFilter(HttpHeadersFilter.Type.REQUEST) {
            @Override
            public HttpHeaders filter(HttpHeaders input, ServerWebExchange exchange) {
                HttpHeaders headers = new HttpHeaders();
                headers.putAll(input);
                headers.remove(HttpHeaders.AUTHORIZATION);
                headers.remove(HttpHeaders.PROXY_AUTHORIZATION);
                headers.remove(properties.callerHeader());
                URI target = exchange.getAttribute(ServerWebExchangeUtils.GATEWAY_REQUEST_URL_ATTR);
                Caller caller = exchange.getAttribute(GatewayAttributes.CALLER);
                if (target != null && allowlist.admits(target.getHost(), target.getPort())) {
                    if (!properties.internalApiKey().isBlank()) {
                        headers.setBearerAuth(properties.internalApiKey());
                    }
                    if (caller != null) {
                        headers.set(properties.callerHeader(), caller.name());
                    }
                }
                return headers;
            }
        };
    }

    /** The pods' {@code server: uvicorn} says what runs behind the gateway; clients need not know. */
    @Bean
    public HttpHeadersFilter hideUpstreamServer() {
        return new OrderedHeadersFilter(HttpHeadersFilter.Type.RESPONSE) {
            @Override
            public HttpHeaders filter(HttpHeaders input, ServerWebExchange exchange) {
                if (!input.containsKey("Server")) {
                    return input;
                }
                HttpHeaders headers = new HttpHeaders();
                headers.putAll(input);
                headers.remove("Server");
                return headers;
            }
        };
    }

    /** Runs after Spring Cloud Gateway's own header filters (forwarded, hop-by-hop). */
    private abstract static class OrderedHeadersFilter implements HttpHeadersFilter, Ordered {
        private final Type type;

        OrderedHeadersFilter(Type type) {
            this.type = type;
        }

        @Override
        public boolean supports(Type t) {
            return t == type;
        }

        @Override
        public int getOrder() {
            return Ordered.LOWEST_PRECEDENCE;
        }
    }
}
