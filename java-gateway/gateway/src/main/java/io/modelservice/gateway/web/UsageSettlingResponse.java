package io.modelservice.gateway.web;

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.List;
import java.util.concurrent.TimeoutException;

import com.fasterxml.jackson.databind.ObjectMapper;
import io.modelservice.gateway.usage.UsageTap;
import org.reactivestreams.Publisher;
import org.springframework.core.io.buffer.DataBuffer;
import org.springframework.http.MediaType;
import org.springframework.http.server.reactive.ServerHttpResponse;
import org.springframework.http.server.reactive.ServerHttpResponseDecorator;
import reactor.core.publisher.Flux;
import reactor.core.publisher.Mono;
import reactor.core.publisher.SignalType;

/**
 * Passes a model's answer through to the client while a {@link UsageTap} reads its usage, and settles the
 * request's {@link TokenReservation} as soon as the usage is known (or when the answer ends without it).
 * Bounds the silence inside a stream ({@code stream-idle-timeout}) with a final SSE error event.
 */
final class UsageSettlingResponse extends ServerHttpResponseDecorator {

    private final TokenReservation reservation;
    private final boolean injectedUsage;
    private final Duration streamIdleTimeout;
    private final OpenAiErrors errors;
    private final ObjectMapper json;

    UsageSettlingResponse(ServerHttpResponse response, TokenReservation reservation, boolean injectedUsage,
                          Duration streamIdleTimeout, OpenAiErrors errors, ObjectMapper json) {
        super(response);
        this.errors = errors;
        this.json = json;
        this.reservation = reservation;
        this.injectedUsage = injectedUsage;
        this.streamIdleTimeout = streamIdleTimeout;
    }

    private boolean tapped() {
        // Only successful model answers carry usage; errors (ours or upstream's) pass as they are.
        var status = getStatusCode();
        MediaType type = getHeaders().getContentType();
        return status != null && status.is2xxSuccessful() && type != null
                && (MediaType.TEXT_EVENT_STREAM.isCompatibleWith(type)
                    || MediaType.APPLICATION_JSON.isCompatibleWith(type));
    }

    private boolean isSse() {
        MediaType type = getHeaders().getContentType();
        return type != null && MediaType.TEXT_EVENT_STREAM.isCompatibleWith(type);
    }

    @Override
    public Mono<Void> writeWith(Publisher<? extends DataBuffer> body) {
        if (!tapped()) {
            return super.writeWith(body);
        }
        return super.writeWith(tap(Flux.from(body)));
    }

    @Override
    public Mono<Void> writeAndFlushWith(Publisher<? extends Publisher<? extends DataBuffer>> body) {
        if (!tapped()) {
            return super.writeAndFlushWith(body);
        }
        Flux<DataBuffer> flat = Flux.from(body).concatMap(Flux::from);
        return super.writeAndFlushWith(tap(flat).map(Flux::just));
    }

    private Flux<DataBuffer> tap(Flux<? extends DataBuffer> body) {
        boolean sse = isSse();
        UsageTap tap = new UsageTap(sse, sse && injectedUsage, json);
        reservation.attach(tap);
        ServerHttpResponse delegate = getDelegate();
        Flux<DataBuffer> source = Flux.from(body).map(b -> (DataBuffer) b);
        if (sse) {
            source = source.timeout(streamIdleTimeout)
                    .onErrorResume(TimeoutException.class, e -> Flux.just(delegate.bufferFactory().wrap((
                            "data: " + new String(errors.body(OpenAiErrors.ApiError.of(504,
                                    "The model stopped sending for " + streamIdleTimeout.toSeconds() + "s.",
                                    "timeout_error", "stream_idle_timeout")), StandardCharsets.UTF_8)
                                    + "\n\n").getBytes(StandardCharsets.UTF_8))));
        }
        // Settle as soon as the real usage is known, before the bytes that follow it (a stream's [DONE], a held JSON
        // answer) go out: a client that sends its next request the moment this answer ends must already see its
        // budget charged. doFinally covers answers cut short or without usage.
        return source
                .concatMapIterable(buffer -> settleIfReported(tap.onBuffer(buffer, delegate.bufferFactory())))
                .concatWith(Flux.defer(() -> Flux.fromIterable(
                        settleIfReported(tap.onComplete(delegate.bufferFactory())))))
                .doFinally(signal -> reservation.settleAtEnd(signal == SignalType.CANCEL));
    }

    private List<DataBuffer> settleIfReported(List<DataBuffer> out) {
        reservation.settleIfReported();
        return out;
    }
}
