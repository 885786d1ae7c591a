-- Caller budgets in Redis (io.modelservice.gateway.ratelimit.RedisCallerBudgets): token buckets refilled
-- continuously at (limit / 60) per second up to the limit, the same arithmetic as InMemoryCallerBudgets.Bucket,
-- run as one script so that the check and the reservation are atomic across every gateway replica.
--
-- KEYS[1]: the caller's token bucket, KEYS[2]: its request bucket (hashes {level, updated}; an absent bucket
-- is a full one, so a bucket expires once it would have refilled).
-- ARGV[1] = 'admit': ARGV[2] tokens/minute (0 = off), ARGV[3] requests/minute (0 = off), ARGV[4] tokens to reserve.
--   Returns 'ok', or '<limit> <seconds to wait>' ('tokens 12', 'requests 3') and changes nothing.
-- ARGV[1] = 'settle': ARGV[2] tokens/minute, ARGV[3] tokens to give back (negative: to take). Returns 'ok'.
--
-- The clock is the Redis server's (TIME), shared by every replica whatever their own clocks say.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])  -- microseconds

local function level_of(key, per_minute)
  local v = redis.call('HMGET', key, 'level', 'updated')
  local level, updated = tonumber(v[1]), tonumber(v[2])
  if level == nil or updated == nil then
    return per_minute
  end
  if now > updated then
    level = math.min(per_minute, level + (now - updated) * per_minute / 60000000)
  end
  return level
end

local function store(key, per_minute, level)
  redis.call('HSET', key, 'level', string.format('%.17g', level), 'updated', string.format('%.0f', now))
  -- full again after (limit - level) / rate; a second more for rounding
  local refill_ms = math.ceil((per_minute - level) * 60000 / per_minute) + 1000
  redis.call('PEXPIRE', key, refill_ms)
end

local function seconds_until(missing, per_minute)
  return math.max(1, math.ceil(missing * 60 / per_minute))
end

local op = ARGV[1]
if op == 'admit' then
  local tpm, rpm, reserved = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local tokens, requests
  if tpm > 0 then
    -- admitted while positive, then the whole reservation is taken (the budget may go negative)
    tokens = level_of(KEYS[1], tpm)
    if tokens <= 0 then
      return 'tokens ' .. seconds_until(1e-9 - tokens, tpm)
    end
  end
  if rpm > 0 then
    requests = level_of(KEYS[2], rpm)
    if requests < 1 then
      return 'requests ' .. seconds_until(1 - requests, rpm)
    end
    store(KEYS[2], rpm, requests - 1)
  end
  if tpm > 0 then
    store(KEYS[1], tpm, tokens - reserved)
  end
  return 'ok'
elseif op == 'settle' then
  local tpm, give_back = tonumber(ARGV[2]), tonumber(ARGV[3])
  store(KEYS[1], tpm, math.min(tpm, level_of(KEYS[1], tpm) + give_back))
  return 'ok'
end
return redis.error_reply('caller-budgets.lua: unknown operation ' .. tostring(op))
