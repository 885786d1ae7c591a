package io.modelservice.gateway.config;

import io.netty.handler.timeout.ReadTimeoutException;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.SmartInitializingSingleton;
import org.springframework.boot.web.embedded.netty.NettyServerCustomizer;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import reactor.core.publisher.Hooks;
import reactor.netty.NettyPipeline;

/**
 * Slow clients at the public port: a deadline for each request head ({@link RequestHeadDeadline}), Reactor
 * Netty's read timeouts on the request body, next to {@code server.netty.idle-timeout}. Without them a client that
 * trickles its headers, sends a chunked body without its end, or fewer bytes than its Content-Length, holds a
 * connection (and a request being read) forever.
 */
@Configuration(proxyBeanMethods = false)
public class EdgeServerConfiguration {

    @Bean
    public NettyServerCustomizer edgeReadTimeouts(GatewayProperties properties) {
        GatewayProperties.Edge edge = properties.edge();
        return server -> server.readTimeout(edge.readTimeout()).requestTimeout(edge.requestTimeout())
                .doOnChannelInit((observer, channel, remote) -> {
                    if (channel.pipeline().get(NettyPipeline.HttpTrafficHandler) != null) {
                        channel.pipeline().addAfter(NettyPipeline.HttpTrafficHandler, RequestHeadDeadline.NAME,
                                new RequestHeadDeadline(edge.requestHeadTimeout()));
                    }
                });
    }

    /**
     * A read timeout reaches the body being read (answered 408) and, a moment later, Reactor's "dropped error"
     * hook, which logs it at ERROR; a slow client is routine, not an error of the gateway. Every other dropped
     * error is still logged at ERROR, as Reactor's default does.
     */
    @Bean
    public SmartInitializingSingleton quietDroppedReadTimeouts() {
        Logger log = LoggerFactory.getLogger("reactor.core.publisher.Operators");
        return () -> Hooks.onErrorDropped(e -> {
            if (e instanceof ReadTimeoutException) {
                log.debug("read timeout after the request was answered");
            } else {
                log.error("Operator called default onErrorDropped", e);
            }
        });
    }
}
