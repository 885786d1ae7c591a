package io.modelservice.gateway.web;

import org.springframework.core.io.buffer.DataBuffer;
import org.springframework.core.io.buffer.DefaultDataBufferFactory;
import org.springframework.http.server.reactive.ServerHttpRequest;
import org.springframework.http.server.reactive.ServerHttpRequestDecorator;
import reactor.core.publisher.Flux;

/** A request body held in memory, so that a retry or a fallback can send it again. */
public final class ReplayableBody {

    private ReplayableBody() {
    }

    /** The request with this body; every subscription gets a fresh buffer. {@code null}: the request unchanged. */
    public static ServerHttpRequest of(ServerHttpRequest request, byte[] body) {
        if (body == null) {
            return request;
        }
        return new ServerHttpRequestDecorator(request) {
            @Override
            public Flux<DataBuffer> getBody() {
                return Flux.defer(() -> Flux.just(DefaultDataBufferFactory.sharedInstance.wrap(body)));
            }
        };
    }
}
