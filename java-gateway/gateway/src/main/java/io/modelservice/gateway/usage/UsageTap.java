package io.modelservice.gateway.usage;

import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;
import java.util.List;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import org.springframework.core.io.buffer.DataBuffer;
import org.springframework.core.io.buffer.DataBufferFactory;
import org.springframework.core.io.buffer.DataBufferUtils;

/**
 * Reads the {@code usage} of an OpenAI answer out of the response body as it passes, without holding the body back.
 *
 * <ul>
 *   <li>Server-sent events: every complete event ({@code data: {...}} then a blank line) is inspected as soon as it
 *   is complete; the chunk that carries {@code usage} gives the counts. When the gateway itself asked upstream for
 *   usage ({@code stripUsageEvent}), that usage-only event (empty {@code choices}) is removed, so the client gets
 *   exactly what it asked for. Only an incomplete trailing event is ever held, never the stream.</li>
 *   <li>A JSON answer (not streamed): held until it is complete (at most {@link #MAX_JSON_COPY}; a larger one
 *   passes through unparsed), parsed, then sent unchanged. The model writes such an answer in one piece at the end
 *   anyway, and holding it lets the caller's budget be debited before the client has the answer: otherwise a
 *   client's next request can overtake the debit of the previous one.</li>
 * </ul>
 * {@link #usageReported()} turns true as soon as the upstream's own counts are seen, so the filter can debit them
 * before the rest of the answer (for a stream, the final {@code [DONE]}) reaches the client.
 * One instance per response; not thread-safe (a body is a sequential stream).
 */
public class UsageTap {

    /** Largest non-streamed answer copied for parsing its usage. */
    public static final int MAX_JSON_COPY = 4 * 1024 * 1024;
    /** Largest incomplete event held while waiting for its end; beyond that the stream passes untouched. */
    static final int MAX_PENDING = 1024 * 1024;

    private final ObjectMapper json;
    private final boolean sse;
    private final boolean stripUsageEvent;
    private final ByteArrayOutputStream pending = new ByteArrayOutputStream();
    private boolean passthrough;
    private long contentEvents;
    private Usage usage;

    public UsageTap(boolean sse, boolean stripUsageEvent, ObjectMapper json) {
        this.json = json;
        this.sse = sse;
        this.stripUsageEvent = stripUsageEvent;
        this.passthrough = sse && !stripUsageEvent;
    }

    /** Whether the upstream's own usage has been seen (then {@link #usage()} is final). */
    public boolean usageReported() {
        return usage != null;
    }

    /**
     * Processes one buffer of the body and returns what to send to the client now (the same buffer when nothing
     * needs rewriting). Consumes (releases) the input buffer when it returns a different one.
     */
    public List<DataBuffer> onBuffer(DataBuffer buffer, DataBufferFactory factory) {
        if (!sse) {
            if (passthrough) {
                return List.of(buffer);
            }
            pending.writeBytes(bytesOf(buffer));
            DataBufferUtils.release(buffer);
            if (pending.size() > MAX_JSON_COPY) {
                // Too large to be an LLM answer we should hold: let it all through, uncounted.
                passthrough = true;
                byte[] held = pending.toByteArray();
                pending.reset();
                return List.of(factory.wrap(held));
            }
            return List.of();
        }
        byte[] bytes = bytesOf(buffer);
        if (passthrough) {
            scanEvents(bytes, false);
            return List.of(buffer);
        }
        DataBufferUtils.release(buffer);
        byte[] out = scanEvents(bytes, true);
        if (!passthrough && pending.size() > MAX_PENDING) {
            // An event this large is not an LLM chunk: stop rewriting and let everything through.
            byte[] held = pending.toByteArray();
            pending.reset();
            passthrough = true;
            out = concat(out, held);
        }
        return out.length == 0 ? List.of() : List.of(factory.wrap(out));
    }

    /** At the end of the body: whatever is still held goes out. */
    public List<DataBuffer> onComplete(DataBufferFactory factory) {
        if (!sse) {
            byte[] body = pending.toByteArray();
            pending.reset();
            if (body.length == 0) {
                return List.of();
            }
            parseJsonUsage(body);
            return List.of(factory.wrap(body));
        }
        byte[] rest = pending.toByteArray();
        pending.reset();
        if (rest.length > 0 && !passthrough) {
            inspectEvent(new String(rest, StandardCharsets.UTF_8));
            return List.of(factory.wrap(rest));
        }
        if (rest.length > 0) {
            inspectEvent(new String(rest, StandardCharsets.UTF_8));
        }
        return List.of();
    }

    /** The usage seen so far, or an estimate when the upstream sent none. */
    public Usage usage() {
        if (usage != null) {
            return usage;
        }
        return contentEvents == 0 ? Usage.NONE : new Usage(0, contentEvents, contentEvents, false);
    }

    /**
     * Appends bytes to the pending event text; inspects each complete event. When {@code rewrite}, returns the bytes
     * of the complete events to send (the usage-only event dropped); otherwise returns nothing and only scans.
     */
    private byte[] scanEvents(byte[] bytes, boolean rewrite) {
        pending.writeBytes(bytes);
        byte[] all = pending.toByteArray();
        ByteArrayOutputStream out = new ByteArrayOutputStream(rewrite ? all.length : 0);
        int start = 0;
        while (true) {
            int[] boundary = findEventEnd(all, start);
            if (boundary == null) {
                break;
            }
            int end = boundary[0] + boundary[1];
            String event = new String(all, start, boundary[0] - start, StandardCharsets.UTF_8);
            boolean keep = inspectEvent(event);
            if (rewrite && keep) {
                out.write(all, start, end - start);
            }
            start = end;
        }
        pending.reset();
        if (passthrough && !rewrite) {
            // scanning only: keep at most the bounded tail of an incomplete event
            if (all.length - start <= MAX_PENDING) {
                pending.write(all, start, all.length - start);
            }
        } else {
            pending.write(all, start, all.length - start);
        }
        return out.toByteArray();
    }

    /** Returns [index of the end of the event, length of the separator], or null if no complete event. */
    static int[] findEventEnd(byte[] b, int from) {
        for (int i = from; i < b.length - 1; i++) {
            if (b[i] == '\n' && b[i + 1] == '\n') {
                return new int[] {i, 2};
            }
            if (b[i] == '\r' && i + 3 < b.length && b[i + 1] == '\n' && b[i + 2] == '\r' && b[i + 3] == '\n') {
                return new int[] {i, 4};
            }
        }
        return null;
    }

    /** Looks at one event; returns false when it is the usage-only event the client did not ask for. */
    private boolean inspectEvent(String event) {
        StringBuilder data = new StringBuilder();
        for (String line : event.split("\r?\n")) {
            if (line.startsWith("data:")) {
                if (data.length() > 0) {
                    data.append('\n');
                }
                data.append(line.substring(line.startsWith("data: ") ? 6 : 5));
            }
        }
        String payload = data.toString().trim();
        if (payload.isEmpty() || payload.equals("[DONE]") || !payload.startsWith("{")) {
            return true;
        }
        boolean mentionsUsage = payload.contains("\"usage\"");
        if (!mentionsUsage) {
            contentEvents++;
            return true;
        }
        JsonNode node;
        try {
            node = json.readTree(payload);
        } catch (Exception e) {
            return true;
        }
        JsonNode u = node.get("usage");
        if (u == null || !u.isObject()) {
            contentEvents++;
            return true;
        }
        usage = toUsage(u);
        JsonNode choices = node.get("choices");
        boolean usageOnly = choices != null && choices.isArray() && choices.isEmpty();
        return !(stripUsageEvent && usageOnly);
    }

    private void parseJsonUsage(byte[] body) {
        if (body.length == 0) {
            return;
        }
        try {
            JsonNode u = json.readTree(body).get("usage");
            if (u != null && u.isObject()) {
                usage = toUsage(u);
            }
        } catch (Exception ignored) {
            // not JSON (or cut short): no usage
        }
    }

    private static Usage toUsage(JsonNode u) {
        long prompt = u.path("prompt_tokens").asLong(0);
        long completion = u.path("completion_tokens").asLong(0);
        long total = u.has("total_tokens") ? u.path("total_tokens").asLong(0) : prompt + completion;
        return new Usage(prompt, completion, total, true);
    }

    private static byte[] bytesOf(DataBuffer buffer) {
        byte[] bytes = new byte[buffer.readableByteCount()];
        int position = buffer.readPosition();
        buffer.read(bytes);
        buffer.readPosition(position);
        return bytes;
    }

    private static byte[] concat(byte[] a, byte[] b) {
        byte[] out = new byte[a.length + b.length];
        System.arraycopy(a, 0, out, 0, a.length);
        System.arraycopy(b, 0, out, a.length, b.length);
        return out;
    }
}
