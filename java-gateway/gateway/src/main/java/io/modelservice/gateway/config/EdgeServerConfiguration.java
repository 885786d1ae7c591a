package io.modelservice.gateway.config;

import org.springframework.boot.web.embedded.netty.NettyServerCustomizer;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;

/**
 * Slow clients at the public port: Reactor Netty's read timeouts on the request body, next to
 * {@code server.netty.idle-timeout} (a connection waiting for its request headers). Without them a client that
 * sends a chunked body without its end, or fewer bytes than its Content-Length, holds a connection (and a request
 * being read) forever.
 */
@Configuration(proxyBeanMethods = false)
public class EdgeServerConfiguration {

    @Bean
    public NettyServerCustomizer edgeReadTimeouts(GatewayProperties properties) {
        GatewayProperties.Edge edge = properties.getEdge();
        return server -> server.readTimeout(edge.getReadTimeout()).requestTimeout(edge.getRequestTimeout());
    }
}
