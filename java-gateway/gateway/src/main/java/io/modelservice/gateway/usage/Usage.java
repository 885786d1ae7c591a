package io.modelservice.gateway.usage;

/**
 * Token counts of one answer. {@code reported} is false when the upstream sent no usage (a stream cut short):
 * then {@code completionTokens} is estimated from the number of content chunks seen.
 */
public record Usage(long promptTokens, long completionTokens, long totalTokens, boolean reported) {
    public static final Usage NONE = new Usage(0, 0, 0, false);
}
