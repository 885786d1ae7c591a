package io.modelservice.client;

import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.function.Consumer;
import java.util.function.Function;

import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.stub.MetadataUtils;
import io.modelservice.llm.v1.ChatRequest;
import io.modelservice.llm.v1.ChatResponse;
import io.modelservice.llm.v1.ChatStreamResponse;
import io.modelservice.llm.v1.LlmServiceGrpc;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Calls the model service over gRPC with a deadline on every call, failing over to the next instance when one is
 * UNAVAILABLE (down, loading, draining) or RESOURCE_EXHAUSTED (full). A stream fails over only before its first
 * message: once text was delivered it is not replayed.
 */
public final class LlmClient implements AutoCloseable {

    private static final Logger log = LoggerFactory.getLogger(LlmClient.class);

    /** Where the instances come from (Nacos in production, a fixed list in tests). */
    @FunctionalInterface
    public interface EndpointSource {
        List<Endpoint> endpoints() throws Exception;
    }

    private final EndpointSource source;
    private final Function<Endpoint, ManagedChannel> channelFactory;
    private final Map<Endpoint, ManagedChannel> channels = new ConcurrentHashMap<>();
    private final Metadata headers = new Metadata();

    public LlmClient(EndpointSource source, String apiKey) {
        this(source, apiKey, e -> ManagedChannelBuilder.forAddress(e.host(), e.port()).usePlaintext().build());
    }

    public LlmClient(EndpointSource source, String apiKey, Function<Endpoint, ManagedChannel> channelFactory) {
        this.source = source;
        this.channelFactory = channelFactory;
        if (apiKey != null && !apiKey.isBlank()) {
            headers.put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + apiKey);
        }
    }

    /** A unary chat call; tries each instance at most once. */
    public ChatResponse chat(ChatRequest request, Duration deadline) {
        return withFailover(deadline, stub -> stub.chat(request));
    }

    /**
     * A streaming chat call: {@code onMessage} gets every message as it arrives; returns the final one (finish
     * reason and usage). Once a message has arrived, a failure is the caller's: the stream is not restarted
     * elsewhere.
     */
    public ChatStreamResponse chatStream(ChatRequest request, Duration deadline, Consumer<ChatStreamResponse> onMessage) {
        return withFailover(deadline, stub -> {
            boolean received = false;
            ChatStreamResponse finalMessage = null;
            try {
                var messages = stub.chatStream(request);
                while (messages.hasNext()) {
                    ChatStreamResponse message = messages.next();
                    received = true;
                    onMessage.accept(message);
                    finalMessage = message;
                }
                return finalMessage;
            } catch (StatusRuntimeException e) {
                throw received ? new Committed(e) : e;
            }
        });
    }

    /** One try on one instance, through a stub that already carries what is left of the caller's deadline. */
    private interface Attempt<T> {
        T call(LlmServiceGrpc.LlmServiceBlockingStub stub);
    }

    /** A failure an attempt must not retry elsewhere (its stream already delivered messages). */
    private static final class Committed extends RuntimeException {
        Committed(StatusRuntimeException cause) {
            super(cause);
        }
    }

    /** Runs {@code attempt} on each instance in turn until one answers or fails with a status not worth failing over. */
    private <T> T withFailover(Duration deadline, Attempt<T> attempt) {
        long deadlineNanos = System.nanoTime() + deadline.toNanos();
        StatusRuntimeException last = null;
        for (Endpoint endpoint : order()) {
            long left = deadlineNanos - System.nanoTime();
            if (left <= 0) {
                break;
            }
            try {
                return attempt.call(stub(endpoint).withDeadlineAfter(left, TimeUnit.NANOSECONDS));
            } catch (Committed e) {
                throw (StatusRuntimeException) e.getCause();
            } catch (StatusRuntimeException e) {
                if (!failsOver(e.getStatus())) {
                    throw e;
                }
                log.warn("instance {} answered {}; trying the next one", endpoint, e.getStatus().getCode());
                last = e;
            }
        }
        throw last != null ? last : Status.UNAVAILABLE.withDescription("no model-service instance").asRuntimeException();
    }

    static boolean failsOver(Status status) {
        return status.getCode() == Status.Code.UNAVAILABLE || status.getCode() == Status.Code.RESOURCE_EXHAUSTED;
    }

    /** The instances, starting at a random one, so that clients spread over the pods. */
    private List<Endpoint> order() {
        List<Endpoint> endpoints;
        try {
            endpoints = source.endpoints();
        } catch (Exception e) {
            throw Status.UNAVAILABLE.withDescription("cannot list instances: " + e.getMessage()).withCause(e)
                    .asRuntimeException();
        }
        if (endpoints.isEmpty()) {
            throw Status.UNAVAILABLE.withDescription("no healthy model-service instance with a gRPC port")
                    .asRuntimeException();
        }
        int start = ThreadLocalRandom.current().nextInt(endpoints.size());
        List<Endpoint> ordered = new ArrayList<>(endpoints.size());
        for (int i = 0; i < endpoints.size(); i++) {
            ordered.add(endpoints.get((start + i) % endpoints.size()));
        }
        return ordered;
    }

    private LlmServiceGrpc.LlmServiceBlockingStub stub(Endpoint endpoint) {
        ManagedChannel channel = channels.computeIfAbsent(endpoint, channelFactory);
        return LlmServiceGrpc.newBlockingStub(channel)
                .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers));
    }

    @Override
    public void close() {
        for (ManagedChannel channel : channels.values()) {
            channel.shutdownNow();
        }
        for (ManagedChannel channel : channels.values()) {
            try {
                channel.awaitTermination(2, TimeUnit.SECONDS);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }
    }
}
