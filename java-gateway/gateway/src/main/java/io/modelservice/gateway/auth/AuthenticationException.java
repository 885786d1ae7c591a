package io.modelservice.gateway.auth;

/** Missing or wrong credentials (401). The message goes to the client: it never contains the credential. */
public class AuthenticationException extends RuntimeException {
    public AuthenticationException(String message) {
        super(message);
    }
}
