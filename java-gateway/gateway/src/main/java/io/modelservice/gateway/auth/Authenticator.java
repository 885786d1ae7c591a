package io.modelservice.gateway.auth;

import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.LinkedHashSet;
import java.util.Locale;
import java.util.Map;

import io.modelservice.gateway.config.GatewayProperties;
import org.springframework.stereotype.Component;

/**
 * Turns an {@code Authorization} header into a {@link Caller}: a configured API key (looked up by its SHA-256, the
 * plain key is never stored) or, when enabled, a signed JWT.
 */
@Component
public class Authenticator {

    private final Map<String, Caller> callersByHash = new HashMap<>();
    private final JwtAuthenticator jwt;

    public Authenticator(GatewayProperties properties) {
        for (GatewayProperties.ApiKey key : properties.apiKeys()) {
            Caller caller = new Caller(key.name(), "api_key", new LinkedHashSet<>(key.models()),
                    key.requestsPerMinute(), key.tokensPerMinute());
            if (callersByHash.put(key.sha256().toLowerCase(Locale.ROOT), caller) != null) {
                throw new IllegalStateException("two API keys share the same sha256 (" + key.name() + ")");
            }
        }
        this.jwt = properties.jwt().enabled() ? new JwtAuthenticator(properties.jwt()) : null;
    }

    /** @throws AuthenticationException when the header is missing, malformed or names no valid credential. */
    public Caller authenticate(String authorizationHeader) {
        if (authorizationHeader == null || authorizationHeader.isBlank()) {
            throw new AuthenticationException(
                    "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.");
        }
        String header = authorizationHeader.trim();
        int space = header.indexOf(' ');
        if (space < 0 || !header.substring(0, space).equalsIgnoreCase("Bearer")) {
            throw new AuthenticationException("The Authorization header must be 'Bearer <key>'.");
        }
        String token = header.substring(space + 1).trim();
        if (token.isEmpty()) {
            throw new AuthenticationException("The Authorization header must be 'Bearer <key>'.");
        }
        if (jwt != null && JwtAuthenticator.looksLikeJwt(token)) {
            return jwt.authenticate(token);
        }
        Caller caller = callersByHash.get(sha256Hex(token));
        if (caller == null) {
            throw new AuthenticationException("Incorrect API key provided.");
        }
        return caller;
    }

    /** Lower-case hex SHA-256 of the UTF-8 bytes. */
    public static String sha256Hex(String value) {
        try {
            byte[] digest = MessageDigest.getInstance("SHA-256").digest(value.getBytes(StandardCharsets.UTF_8));
            return HexFormat.of().formatHex(digest);
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }
}
