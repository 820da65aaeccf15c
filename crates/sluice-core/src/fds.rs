//! The open-file budget: what each part of sluice holds, so that `max_connections` (given or
//! derived) never promises connections the process cannot open.
//!
//! A relayed TCP connection holds two sockets; while it moves bulk data it also holds a splice
//! pipe (two descriptors), and pipes are capped at `limits.max_pipes`, by default a quarter of
//! `max_connections` (HAProxy's `maxpipes` default): 2.5 descriptors per connection in all. Beside the connections: the
//! admin API's and the heartbeat API's own connections (capped here by the budget), one UDP
//! socket per QUIC flow (`max_flows` per QUIC listener), one per listener, and `RESERVED` for
//! the rest (standard streams, the runtime's epoll and wakers, log files, the config watcher,
//! DNS and health-check sockets in flight).

/// Descriptors kept for everything that is not a connection, listener or API connection.
pub const RESERVED: u64 = 64;

/// What the budget is made of, from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// TCP listeners (one socket each).
    pub listeners: u64,
    /// `max_flows` summed over QUIC listeners (one UDP socket per flow).
    pub quic_flows: u64,
    /// The heartbeat API has its own listener.
    pub heartbeat_listener: bool,
    /// `limits.max_pipes` when set (else a quarter of the connections).
    pub pipes: Option<u64>,
}

/// The budget of a process whose open-file limit is `nofile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub nofile: u64,
}

impl Budget {
    /// Connections the admin API serves at once.
    pub fn admin_connections(&self) -> usize {
        (self.nofile / 32).clamp(16, 512) as usize
    }

    /// Connections the heartbeat API's own listener serves at once.
    pub fn heartbeat_connections(&self) -> usize {
        (self.nofile / 8).clamp(64, 10_000) as usize
    }

    /// Splice pipes at most, for `max_connections`: past them, relays copy.
    pub fn pipes(shape: Shape, max_connections: usize) -> usize {
        match shape.pipes {
            Some(p) => p as usize,
            None => (max_connections / 4).max(1),
        }
    }

    /// Everything but the connections themselves.
    fn fixed(&self, shape: Shape) -> u64 {
        let hb = if shape.heartbeat_listener {
            self.heartbeat_connections() as u64
        } else {
            0
        };
        RESERVED + shape.listeners + shape.quic_flows + self.admin_connections() as u64 + hb
    }

    /// Descriptors the process may need with `max_connections`.
    pub fn needed(&self, shape: Shape, max_connections: usize) -> u64 {
        let mc = max_connections as u64;
        self.fixed(shape) + 2 * mc + 2 * Self::pipes(shape, max_connections) as u64
    }

    /// The largest `max_connections` that fits (at least 16: a process with less is
    /// misconfigured anyway, and `needed` says by how much).
    pub fn max_connections(&self, shape: Shape) -> usize {
        let room = self.nofile.saturating_sub(self.fixed(shape));
        let mut mc = match shape.pipes {
            // 2 sockets per connection, the pipes apart.
            Some(p) => (room.saturating_sub(2 * p) / 2) as usize,
            // 2 sockets + 2 descriptors per pipe, one pipe per four connections.
            None => (room * 2 / 5) as usize,
        };
        while mc > 16 && self.needed(shape, mc) > self.nofile {
            mc -= 1;
        }
        // Whole pipes round down: a few more may fit.
        while mc < 10_000_000 && self.needed(shape, mc + 1) <= self.nofile {
            mc += 1;
        }
        mc.clamp(16, 10_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: Shape = Shape {
        listeners: 1,
        quic_flows: 0,
        heartbeat_listener: false,
        pipes: None,
    };

    #[test]
    fn the_derived_cap_fits_and_one_more_would_not() {
        for nofile in [300u64, 1024, 4096, 65_536, 1_048_576] {
            let b = Budget { nofile };
            let mc = b.max_connections(TCP);
            assert!(b.needed(TCP, mc) <= nofile, "{nofile}: {mc}");
            assert!(
                b.needed(TCP, mc + 1) > nofile || mc + 1 > 10_000_000,
                "{nofile}: {mc} is not the largest"
            );
        }
        // ulimit -n 300: 64 reserved, 1 listener, 16 admin connections → 219 for
        // connections at 2.5 descriptors each.
        assert_eq!(Budget { nofile: 300 }.max_connections(TCP), 87);
        // The APIs' caps follow the budget.
        assert_eq!(Budget { nofile: 300 }.admin_connections(), 16);
        assert_eq!(Budget { nofile: 1 << 20 }.admin_connections(), 512);
        assert_eq!(Budget { nofile: 1 << 20 }.heartbeat_connections(), 10_000);
    }

    #[test]
    fn quic_flows_and_the_heartbeat_listener_take_their_share() {
        let b = Budget { nofile: 100_000 };
        let quic = Shape {
            quic_flows: 50_000,
            heartbeat_listener: true,
            ..TCP
        };
        assert!(b.max_connections(quic) < b.max_connections(TCP) - 20_000);
        assert!(b.needed(quic, b.max_connections(quic)) <= 100_000);
        // Flows beyond the limit: the floor, and `needed` shows the overshoot.
        let tiny = Budget { nofile: 1024 };
        assert_eq!(tiny.max_connections(quic), 16);
        assert!(tiny.needed(quic, 16) > 1024);
    }

    #[test]
    fn fewer_pipes_leave_room_for_more_connections() {
        // ulimit -n 20000, as the benchmarks run: a quarter of the connections as pipes
        // allows 7,769; 512 pipes allow 9,199 (idle tunnels need no pipe).
        let b = Budget { nofile: 20_000 };
        assert_eq!(b.max_connections(TCP), 7_769);
        let few = Shape {
            pipes: Some(512),
            ..TCP
        };
        let mc = b.max_connections(few);
        assert_eq!(mc, 9_199);
        assert!(b.needed(few, mc) <= 20_000 && b.needed(few, mc + 1) > 20_000);
        assert_eq!(Budget::pipes(few, mc), 512);
        assert_eq!(Budget::pipes(TCP, 9_000), 2_250);
    }
}
