package io.modelservice.client;

import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicReference;

import com.alibaba.nacos.api.PropertyKeyConst;
import com.alibaba.nacos.api.naming.pojo.Instance;
import io.grpc.Metadata;
import io.grpc.Server;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.ServerInterceptors;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.inprocess.InProcessChannelBuilder;
import io.grpc.inprocess.InProcessServerBuilder;
import io.grpc.stub.StreamObserver;
import io.modelservice.llm.v1.ChatRequest;
import io.modelservice.llm.v1.ChatResponse;
import io.modelservice.llm.v1.ChatStreamResponse;
import io.modelservice.llm.v1.FinishReason;
import io.modelservice.llm.v1.LlmServiceGrpc;
import io.modelservice.llm.v1.Usage;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

class LlmClientTest {

    /** A fake pod: answers, or fails every call with a fixed status. */
    static final class FakePod extends LlmServiceGrpc.LlmServiceImplBase {
        final String name;
        final Status failure;
        final AtomicInteger calls = new AtomicInteger();
        final AtomicReference<String> authorization = new AtomicReference<>();
        volatile boolean breakAfterFirstMessage;

        FakePod(String name, Status failure) {
            this.name = name;
            this.failure = failure;
        }

        @Override
        public void chat(ChatRequest request, StreamObserver<ChatResponse> out) {
            calls.incrementAndGet();
            if (failure != null) {
                out.onError(failure.asRuntimeException());
                return;
            }
            out.onNext(ChatResponse.newBuilder().setText("answer from " + name)
                    .setFinishReason(FinishReason.FINISH_REASON_STOP)
                    .setUsage(Usage.newBuilder().setPromptTokens(3).setCompletionTokens(2).setTotalTokens(5)).build());
            out.onCompleted();
        }

        @Override
        public void chatStream(ChatRequest request, StreamObserver<ChatStreamResponse> out) {
            calls.incrementAndGet();
            if (failure != null) {
                out.onError(failure.asRuntimeException());
                return;
            }
            for (String piece : List.of("Par", "is")) {
                out.onNext(ChatStreamResponse.newBuilder().setText(piece).build());
                if (breakAfterFirstMessage) {
                    out.onError(Status.UNAVAILABLE.withDescription("pod went away").asRuntimeException());
                    return;
                }
            }
            out.onNext(ChatStreamResponse.newBuilder().setFinishReason(FinishReason.FINISH_REASON_STOP)
                    .setUsage(Usage.newBuilder().setTotalTokens(9)).build());
            out.onCompleted();
        }
    }

    final List<Server> servers = new ArrayList<>();

    Endpoint serve(FakePod pod) throws Exception {
        ServerInterceptor captureAuth = new ServerInterceptor() {
            @Override
            public <Q, A> ServerCall.Listener<Q> interceptCall(ServerCall<Q, A> call, Metadata headers,
                                                               ServerCallHandler<Q, A> next) {
                pod.authorization.set(headers.get(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER)));
                return next.startCall(call, headers);
            }
        };
        servers.add(InProcessServerBuilder.forName(pod.name).directExecutor()
                .addService(ServerInterceptors.intercept(pod, captureAuth)).build().start());
        return new Endpoint(pod.name, 1, "");
    }

    LlmClient client(List<Endpoint> endpoints) {
        return new LlmClient(() -> endpoints, "k-internal",
                e -> InProcessChannelBuilder.forName(e.host()).directExecutor().build());
    }

    @AfterEach
    void stop() {
        servers.forEach(Server::shutdownNow);
    }

    static ChatRequest question() {
        return LlmClientMain.request(LlmClientMain.parse(new String[] {"--max-tokens", "8", "hello"}));
    }

    @Test
    void failsOverToTheNextInstanceWhenOneIsUnavailable() throws Exception {
        FakePod down = new FakePod("down-" + System.nanoTime(), Status.UNAVAILABLE);
        FakePod full = new FakePod("full-" + System.nanoTime(), Status.RESOURCE_EXHAUSTED);
        FakePod up = new FakePod("up-" + System.nanoTime(), null);
        List<Endpoint> endpoints = List.of(serve(down), serve(full), serve(up));
        try (LlmClient client = client(endpoints)) {
            // The client starts at a random instance; call until both failing pods were tried first
            // (bounded: missing one in 200 calls has probability (2/3)^200).
            for (int i = 0; i < 200 && (down.calls.get() == 0 || full.calls.get() == 0); i++) {
                ChatResponse response = client.chat(question(), Duration.ofSeconds(5));
                assertEquals("answer from " + up.name, response.getText());
                assertEquals(5, response.getUsage().getTotalTokens());
            }
            assertTrue(down.calls.get() > 0 && full.calls.get() > 0);
            assertEquals("Bearer k-internal", up.authorization.get());

            StringBuilder text = new StringBuilder();
            ChatStreamResponse last = client.chatStream(question(), Duration.ofSeconds(5),
                    m -> text.append(m.getText()));
            assertEquals("Paris", text.toString());
            assertEquals(9, last.getUsage().getTotalTokens());
        }
    }

    @Test
    void doesNotRetryRequestErrors() throws Exception {
        FakePod invalid = new FakePod("invalid-" + System.nanoTime(), Status.INVALID_ARGUMENT.withDescription("bad"));
        FakePod up = new FakePod("up2-" + System.nanoTime(), null);
        List<Endpoint> endpoints = List.of(serve(invalid), serve(up));
        try (LlmClient client = client(endpoints)) {
            // The client starts at a random instance; call until the invalid pod was tried (bounded: missing
            // it in 200 calls has probability (1/2)^200), so the checks below never pass on 0 == 0.
            int failures = 0;
            int answered = 0;
            for (int i = 0; i < 200 && invalid.calls.get() == 0; i++) {
                try {
                    assertEquals("answer from " + up.name, client.chat(question(), Duration.ofSeconds(5)).getText());
                    answered++;
                } catch (StatusRuntimeException e) {
                    assertEquals(Status.Code.INVALID_ARGUMENT, e.getStatus().getCode());
                    failures++;
                }
            }
            assertTrue(invalid.calls.get() > 0, "the invalid pod was never tried");
            assertEquals(invalid.calls.get(), failures);  // each INVALID_ARGUMENT reached the caller as it was
            assertEquals(answered, up.calls.get());  // and none was retried on the healthy pod
        }
    }

    @Test
    void aStreamThatBrokeAfterItsFirstMessageIsNotRestartedElsewhere() throws Exception {
        FakePod breaking = new FakePod("breaking-" + System.nanoTime(), null);
        breaking.breakAfterFirstMessage = true;
        FakePod up = new FakePod("up3-" + System.nanoTime(), null);
        try (LlmClient client = client(List.of(serve(breaking), serve(up)))) {
            int served = 0;
            for (int i = 0; i < 200 && breaking.calls.get() == 0; i++) {
                List<String> seen = new ArrayList<>();
                try {
                    client.chatStream(question(), Duration.ofSeconds(5), m -> seen.add(m.getText()));
                    assertEquals(List.of("Par", "is", ""), seen);
                    served++;
                } catch (StatusRuntimeException e) {
                    // the caller has "Par" already: restarting elsewhere would repeat it, so the error is theirs
                    assertEquals(Status.Code.UNAVAILABLE, e.getStatus().getCode());
                    assertEquals(List.of("Par"), seen);
                }
            }
            assertEquals(1, breaking.calls.get());
            assertEquals(served, up.calls.get());
        }
    }

    @Test
    void noInstanceIsUnavailable() {
        try (LlmClient client = client(List.of())) {
            StatusRuntimeException e = assertThrows(StatusRuntimeException.class,
                    () -> client.chat(question(), Duration.ofSeconds(1)));
            assertEquals(Status.Code.UNAVAILABLE, e.getStatus().getCode());
        }
    }

    @Test
    void nacosInstancesNeedAGrpcPortAndHealth() {
        Instance ok = new Instance();
        ok.setIp("10.0.0.5");
        ok.setPort(8000);
        ok.setHealthy(true);
        ok.setEnabled(true);
        ok.setMetadata(Map.of("gRPC_port", "50051", "model", "smollm2-135m-instruct"));
        assertEquals(new Endpoint("10.0.0.5", 50051, "smollm2-135m-instruct"), NacosEndpoints.toEndpoint(ok));

        Instance noGrpc = new Instance();
        noGrpc.setIp("10.0.0.6");
        noGrpc.setHealthy(true);
        noGrpc.setEnabled(true);
        noGrpc.setMetadata(Map.of("model", "x"));
        assertNull(NacosEndpoints.toEndpoint(noGrpc));

        Instance unhealthy = new Instance();
        unhealthy.setIp("10.0.0.7");
        unhealthy.setHealthy(false);
        unhealthy.setMetadata(Map.of("gRPC_port", "50051"));
        assertNull(NacosEndpoints.toEndpoint(unhealthy));
    }

    @Test
    void parsesTheCommandLine() {
        LlmClientMain.Options o = LlmClientMain.parse(new String[] {
                "--nacos", "127.0.0.1:9999", "--stream", "--max-tokens", "12", "--deadline-s", "2.5", "What", "is", "up?"});
        assertEquals("127.0.0.1:9999", o.nacos());
        assertTrue(o.stream());
        assertEquals(12, o.maxTokens());
        assertEquals(2.5, o.deadlineSeconds());
        assertEquals("What is up?", o.question());
        assertThrows(IllegalArgumentException.class, () -> LlmClientMain.parse(new String[] {"--bogus", "q"}));
        assertThrows(IllegalArgumentException.class, () -> LlmClientMain.parse(new String[] {"--stream"}));
        assertThrows(IllegalArgumentException.class,
                () -> LlmClientMain.parse(new String[] {"--target", "nohost", "q"}));
    }

    @Test
    void nacosLoginComesFromSystemPropertiesThenEnvironment() {
        Map<String, String> env = Map.of("NACOS_USERNAME", "reader", "NACOS_PASSWORD", "s3cret");
        Properties fromEnv = NacosEndpoints.clientProperties("10.0.0.1:8848", "prod", k -> null, env::get);
        assertEquals("10.0.0.1:8848", fromEnv.getProperty(PropertyKeyConst.SERVER_ADDR));
        assertEquals("prod", fromEnv.getProperty(PropertyKeyConst.NAMESPACE));
        assertEquals("reader", fromEnv.getProperty(PropertyKeyConst.USERNAME));
        assertEquals("s3cret", fromEnv.getProperty(PropertyKeyConst.PASSWORD));

        Map<String, String> sys = Map.of("nacos.username", "ops", "nacos.password", "other");
        Properties fromSys = NacosEndpoints.clientProperties("10.0.0.1:8848", null, sys::get, env::get);
        assertEquals("ops", fromSys.getProperty(PropertyKeyConst.USERNAME));
        assertEquals("other", fromSys.getProperty(PropertyKeyConst.PASSWORD));
        assertNull(fromSys.getProperty(PropertyKeyConst.NAMESPACE));

        Properties anonymous = NacosEndpoints.clientProperties("10.0.0.1:8848", null, k -> null, k -> "");
        assertNull(anonymous.getProperty(PropertyKeyConst.USERNAME));
        assertNull(anonymous.getProperty(PropertyKeyConst.PASSWORD));
    }
}
