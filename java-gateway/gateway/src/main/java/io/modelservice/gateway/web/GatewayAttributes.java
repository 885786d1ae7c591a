package io.modelservice.gateway.web;

/** Exchange attributes the gateway's filters share (and the access log reads). */
public final class GatewayAttributes {
    private static final String P = "llm-gateway.";

    public static final String CALLER = P + "caller";
    public static final String MODEL = P + "model";
    public static final String STREAM = P + "stream";
    /** The request body as forwarded (bytes), for fallbacks that rewrite it. */
    public static final String BODY = P + "body";
    /** The size of the request body as the client sent it (int), for the prompt estimate. */
    public static final String BODY_SIZE = P + "bodySize";
    /** The request's own completion cap (long: max_completion_tokens, else max_tokens); absent if it set none. */
    public static final String MAX_COMPLETION_TOKENS = P + "maxCompletionTokens";
    /** Whether the gateway asked upstream for the stream's usage chunk, which the client had not (boolean). */
    public static final String STREAM_USAGE_INJECTED = P + "streamUsageInjected";
    /** The {@link TokenReservation} an admitted request holds in its caller's budget. */
    public static final String RESERVATION = P + "reservation";
    /** The path the client asked for (before any internal forward). */
    public static final String ORIGINAL_PATH = P + "originalPath";
    public static final String USAGE = P + "usage";
    public static final String ERROR_CODE = P + "errorCode";
    /** The status of an answer the HTTP server sent itself (a body it could not decode), for the access log. */
    public static final String ANSWERED_STATUS = P + "answeredStatus";
    /** Set of "host:port" instances already tried by this request. */
    public static final String TRIED_INSTANCES = P + "triedInstances";
    /** The instance that answered (last attempt). */
    public static final String UPSTREAM = P + "upstream";
    public static final String FALLBACK_ROUTE = P + "fallbackRoute";
    /** The model name to send when the request is served by the fallback route. */
    public static final String FALLBACK_MODEL = P + "fallbackModel";

    private GatewayAttributes() {
    }
}
