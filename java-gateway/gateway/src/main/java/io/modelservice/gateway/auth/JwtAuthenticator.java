package io.modelservice.gateway.auth;

import java.security.KeyFactory;
import java.security.interfaces.RSAPublicKey;
import java.security.spec.X509EncodedKeySpec;
import java.text.ParseException;
import java.time.Instant;
import java.util.Base64;
import java.util.Date;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Set;

import com.nimbusds.jose.JOSEException;
import com.nimbusds.jose.JWSAlgorithm;
import com.nimbusds.jose.JWSVerifier;
import com.nimbusds.jose.crypto.MACVerifier;
import com.nimbusds.jose.crypto.RSASSAVerifier;
import com.nimbusds.jwt.JWTClaimsSet;
import com.nimbusds.jwt.SignedJWT;
import io.modelservice.gateway.config.GatewayProperties;

/** Verifies HS256 or RS256 bearer JWTs: signature, exp/nbf (with skew), iss and aud when configured. */
public class JwtAuthenticator {

    private final GatewayProperties.Jwt config;
    private final JWSVerifier hmacVerifier;
    private final JWSVerifier rsaVerifier;

    public JwtAuthenticator(GatewayProperties.Jwt config) {
        this.config = config;
        try {
            this.hmacVerifier = config.hmacSecret().isBlank() ? null : new MACVerifier(config.hmacSecret());
            this.rsaVerifier = config.rsaPublicKey().isBlank() ? null
                    : new RSASSAVerifier(parseRsaPublicKey(config.rsaPublicKey()));
        } catch (JOSEException e) {
            throw new IllegalStateException("invalid JWT key configuration: " + e.getMessage(), e);
        }
        if (hmacVerifier == null && rsaVerifier == null) {
            throw new IllegalStateException("llm-gateway.jwt.enabled needs hmac-secret or rsa-public-key");
        }
    }

    static boolean looksLikeJwt(String token) {
        return token.startsWith("eyJ") && token.chars().filter(c -> c == '.').count() == 2;
    }

    public Caller authenticate(String token) {
        SignedJWT jwt;
        JWTClaimsSet claims;
        try {
            jwt = SignedJWT.parse(token);
            claims = jwt.getJWTClaimsSet();
        } catch (ParseException e) {
            throw new AuthenticationException("Invalid bearer token.");
        }
        JWSAlgorithm alg = jwt.getHeader().getAlgorithm();
        JWSVerifier verifier = JWSAlgorithm.HS256.equals(alg) ? hmacVerifier
                : JWSAlgorithm.RS256.equals(alg) ? rsaVerifier : null;
        try {
            if (verifier == null || !jwt.verify(verifier)) {
                throw new AuthenticationException("Invalid bearer token.");
            }
        } catch (JOSEException e) {
            throw new AuthenticationException("Invalid bearer token.");
        }
        Instant now = Instant.now();
        Date exp = claims.getExpirationTime();
        if (exp == null || now.isAfter(exp.toInstant().plus(config.clockSkew()))) {
            throw new AuthenticationException("The bearer token has expired.");
        }
        Date nbf = claims.getNotBeforeTime();
        if (nbf != null && now.isBefore(nbf.toInstant().minus(config.clockSkew()))) {
            throw new AuthenticationException("The bearer token is not valid yet.");
        }
        if (!config.issuer().isBlank() && !config.issuer().equals(claims.getIssuer())) {
            throw new AuthenticationException("The bearer token has the wrong issuer.");
        }
        if (!config.audience().isBlank()
                && (claims.getAudience() == null || !claims.getAudience().contains(config.audience()))) {
            throw new AuthenticationException("The bearer token has the wrong audience.");
        }
        Object name = claims.getClaim(config.callerClaim());
        if (!(name instanceof String caller) || caller.isBlank()) {
            throw new AuthenticationException("The bearer token names no caller.");
        }
        Set<String> models = new LinkedHashSet<>();
        Object claimed = claims.getClaim(config.modelsClaim());
        if (claimed instanceof List<?> list) {
            list.forEach(m -> models.add(String.valueOf(m)));
            if (models.isEmpty()) {
                models.add("\u0000none");  // an explicit empty list allows no model
            }
        }
        return new Caller(caller, "jwt", models, config.requestsPerMinute(), config.tokensPerMinute());
    }

    static RSAPublicKey parseRsaPublicKey(String pem) {
        try {
            String base64 = pem.replaceAll("-----(BEGIN|END) PUBLIC KEY-----", "").replaceAll("\\s", "");
            byte[] der = Base64.getDecoder().decode(base64);
            return (RSAPublicKey) KeyFactory.getInstance("RSA").generatePublic(new X509EncodedKeySpec(der));
        } catch (Exception e) {
            throw new IllegalStateException("llm-gateway.jwt.rsa-public-key is not a PEM RSA public key", e);
        }
    }
}
