package io.modelservice.gateway.usage;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.function.Function;

import com.fasterxml.jackson.databind.ObjectMapper;
import org.junit.jupiter.api.Test;
import org.springframework.core.io.buffer.DataBuffer;
import org.springframework.core.io.buffer.DataBufferFactory;
import org.springframework.core.io.buffer.DefaultDataBufferFactory;

import static org.assertj.core.api.Assertions.assertThat;

class UsageTapTest {

    final DefaultDataBufferFactory factory = DefaultDataBufferFactory.sharedInstance;

    static final String CHUNK_1 = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n";
    static final String CHUNK_2 = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"}}],\"usage\":null}\n\n";
    static final String FINAL = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n";
    static final String USAGE = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":30,\"completion_tokens\":2,\"total_tokens\":32}}\n\n";
    static final String DONE = "data: [DONE]\n\n";

    static final ObjectMapper JSON = new ObjectMapper();

    private String text(DataBuffer buffer) {
        return buffer.toString(StandardCharsets.UTF_8);
    }

    /** Runs whole strings through a tap; returns what it lets out, buffer by buffer. */
    static List<String> run(UsageTap tap, List<String> chunks, DataBufferFactory factory,
                            Function<DataBuffer, String> text) {
        List<String> out = new ArrayList<>();
        for (String chunk : chunks) {
            tap.onBuffer(factory.wrap(chunk.getBytes(StandardCharsets.UTF_8)), factory)
                    .forEach(b -> out.add(text.apply(b)));
        }
        tap.onComplete(factory).forEach(b -> out.add(text.apply(b)));
        return out;
    }

    @Test
    void readsUsageOfAStreamTheClientAskedUsageFor() {
        UsageTap tap = new UsageTap(true, false, JSON);
        List<String> out = run(tap, List.of(CHUNK_1, CHUNK_2, FINAL, USAGE, DONE), factory, this::text);
        assertThat(String.join("", out)).isEqualTo(CHUNK_1 + CHUNK_2 + FINAL + USAGE + DONE);
        assertThat(tap.usage()).isEqualTo(new Usage(30, 2, 32, true));
    }

    @Test
    void passthroughModeForwardsTheVeryBuffersItGets() {
        UsageTap tap = new UsageTap(true, false, JSON);
        DataBuffer in = factory.wrap(CHUNK_1.getBytes(StandardCharsets.UTF_8));
        assertThat(tap.onBuffer(in, factory)).containsExactly(in);
        assertThat(in.readableByteCount()).isEqualTo(CHUNK_1.length());  // not consumed
    }

    @Test
    void removesTheUsageEventItAskedForItself() {
        UsageTap tap = new UsageTap(true, true, JSON);
        List<String> out = run(tap, List.of(CHUNK_1, CHUNK_2, FINAL, USAGE, DONE), factory, this::text);
        assertThat(String.join("", out)).isEqualTo(CHUNK_1 + CHUNK_2 + FINAL + DONE);
        assertThat(out).hasSize(4);  // one write per event: nothing is held back
        assertThat(tap.usage().totalTokens()).isEqualTo(32);
    }

    @Test
    void eventsSplitAcrossBuffersAreReassembledAndCrLfWorks() {
        String all = (CHUNK_1 + USAGE + DONE).replace("\n\n", "\r\n\r\n");
        List<String> pieces = List.of(all.substring(0, 7), all.substring(7, 60), all.substring(60, 150),
                all.substring(150));
        UsageTap tap = new UsageTap(true, true, JSON);
        List<String> out = run(tap, pieces, factory, this::text);
        assertThat(String.join("", out)).isEqualTo((CHUNK_1 + DONE).replace("\n\n", "\r\n\r\n"));
        assertThat(tap.usage().totalTokens()).isEqualTo(32);
    }

    @Test
    void estimatesFromContentChunksWhenAStreamEndsWithoutUsage() {
        UsageTap tap = new UsageTap(true, true, JSON);
        run(tap, List.of(CHUNK_1, CHUNK_2), factory, this::text);
        assertThat(tap.usage()).isEqualTo(new Usage(0, 2, 2, false));
    }

    @Test
    void readsUsageOfAJsonAnswer() {
        UsageTap tap = new UsageTap(false, false, JSON);
        String body = "{\"id\":\"x\",\"choices\":[{\"message\":{\"content\":\"hi\"}}],"
                + "\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}";
        List<String> out = run(tap, List.of(body.substring(0, 20), body.substring(20)), factory, this::text);
        assertThat(String.join("", out)).isEqualTo(body);
        assertThat(tap.usage()).isEqualTo(new Usage(5, 7, 12, true));
    }

    @Test
    void errorEventsAndGarbagePassUntouched() {
        String error = "data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n";
        String comment = ": keep-alive\n\n";
        UsageTap tap = new UsageTap(true, true, JSON);
        List<String> out = run(tap, List.of(comment, error, "data: not json\n\n"), factory, this::text);
        assertThat(String.join("", out)).isEqualTo(comment + error + "data: not json\n\n");
        assertThat(tap.usage().reported()).isFalse();
    }

    @Test
    void usageIsKnownBeforeTheEventsAfterItAreSent() {
        // The filter debits the budget when usageReported() turns true, so it must turn true while [DONE] is unsent.
        UsageTap tap = new UsageTap(true, true, JSON);
        for (String chunk : List.of(CHUNK_1, FINAL, USAGE)) {
            tap.onBuffer(factory.wrap(chunk.getBytes(StandardCharsets.UTF_8)), factory);
        }
        assertThat(tap.usageReported()).isTrue();
        assertThat(tap.usage()).isEqualTo(new Usage(30, 2, 32, true));
    }

    @Test
    void aJsonAnswerIsHeldUntilItsUsageIsKnown() {
        UsageTap tap = new UsageTap(false, false, JSON);
        String body = "{\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}";
        assertThat(tap.onBuffer(factory.wrap(body.substring(0, 10).getBytes(StandardCharsets.UTF_8)), factory)).isEmpty();
        assertThat(tap.onBuffer(factory.wrap(body.substring(10).getBytes(StandardCharsets.UTF_8)), factory)).isEmpty();
        assertThat(tap.usageReported()).isFalse();
        List<DataBuffer> out = tap.onComplete(factory);
        assertThat(tap.usageReported()).isTrue();
        assertThat(out.stream().map(this::text).reduce("", String::concat)).isEqualTo(body);
    }

    @Test
    void aJsonAnswerTooLargeToHoldPassesThroughUncounted() {
        UsageTap tap = new UsageTap(false, false, JSON);
        byte[] big = new byte[UsageTap.MAX_JSON_COPY + 1];
        java.util.Arrays.fill(big, (byte) ' ');
        List<DataBuffer> first = tap.onBuffer(factory.wrap(big), factory);
        assertThat(first.stream().mapToInt(DataBuffer::readableByteCount).sum()).isEqualTo(big.length);
        DataBuffer next = factory.wrap("{}".getBytes(StandardCharsets.UTF_8));
        assertThat(tap.onBuffer(next, factory)).containsExactly(next);
        assertThat(tap.onComplete(factory)).isEmpty();
        assertThat(tap.usageReported()).isFalse();
    }
}
