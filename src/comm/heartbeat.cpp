#include "comm/heartbeat.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <vector>

#include "core/log.h"

namespace pm {
namespace {

constexpr char kBeat = 'h', kGoodbye = 'b';

double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// This host's IPv4 addresses, the ones other hosts can reach first, loopback last.
std::vector<std::string> local_addresses() {
  std::vector<std::string> out, loopback;
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return {"127.0.0.1"};
  for (ifaddrs* a = list; a; a = a->ifa_next) {
    if (!a->ifa_addr || a->ifa_addr->sa_family != AF_INET || !(a->ifa_flags & IFF_UP)) continue;
    char text[INET_ADDRSTRLEN];
    ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr, text, sizeof text);
    ((a->ifa_flags & IFF_LOOPBACK) ? loopback : out).push_back(text);
  }
  ::freeifaddrs(list);
  out.insert(out.end(), loopback.begin(), loopback.end());
  return out;
}

// Connects to address:port within timeout_s; -1 if it cannot.
int connect_within(const std::string& address, int port, double timeout_s) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(static_cast<uint16_t>(port));
  if (::inet_pton(AF_INET, address.c_str(), &to.sin_addr) != 1) {
    ::close(fd);
    return -1;
  }
  if (::connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof to) != 0 && errno != EINPROGRESS) {
    ::close(fd);
    return -1;
  }
  pollfd p{fd, POLLOUT, 0};
  int error = 0;
  socklen_t len = sizeof error;
  if (::poll(&p, 1, static_cast<int>(timeout_s * 1000)) != 1 || ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) != 0 ||
      error != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

bool send_all(int fd, const void* data, std::size_t n) {
  return ::send(fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT) == static_cast<ssize_t>(n);
}

}  // namespace

Heartbeat::Heartbeat(Communicator& world, double timeout_s) : rank_(world.rank()), timeout_s_(timeout_s) {
  const int P = world.size();
  if (P < 2 || timeout_s <= 0) return;
  predecessor_ = (rank_ + P - 1) % P;
  // listen on any address; tell every rank where
  int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in any{};
  any.sin_family = AF_INET;
  any.sin_addr.s_addr = htonl(INADDR_ANY);
  socklen_t len = sizeof any;
  bool ok = listener >= 0 && ::bind(listener, reinterpret_cast<sockaddr*>(&any), sizeof any) == 0 &&
            ::listen(listener, 4) == 0 && ::getsockname(listener, reinterpret_cast<sockaddr*>(&any), &len) == 0;
  std::string mine = std::to_string(ok ? ntohs(any.sin_port) : 0);
  for (const std::string& a : local_addresses()) mine += " " + a;
  std::vector<std::string> all = world.gather_strings(mine, 0);
  std::string joined;
  for (const std::string& s : all) joined += s + "\n";
  joined = world.broadcast_string(joined, 0);
  std::istringstream lines(joined);
  std::string line;
  for (int r = 0; std::getline(lines, line); ++r) {
    if (r != (rank_ + 1) % P) continue;
    std::istringstream words(line);
    int port = 0;
    words >> port;
    for (std::string address; port > 0 && to_successor_ < 0 && words >> address;) {
      to_successor_ = connect_within(address, port, 2.0);
      const int32_t hello = rank_;  // the successor checks who is calling
      if (to_successor_ >= 0 && !send_all(to_successor_, &hello, sizeof hello)) ::close(to_successor_), to_successor_ = -1;
    }
  }
  // the predecessor's call (it may have reached us on another address first: take the one that
  // says it is the predecessor)
  const double deadline = seconds_now() + 10;
  while (ok && from_predecessor_ < 0 && seconds_now() < deadline) {
    pollfd p{listener, POLLIN, 0};
    if (::poll(&p, 1, 200) != 1) continue;
    int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    int32_t hello = -1;
    pollfd q{fd, POLLIN, 0};
    if (::poll(&q, 1, 2000) == 1 && ::recv(fd, &hello, sizeof hello, MSG_WAITALL) == sizeof hello && hello == predecessor_)
      from_predecessor_ = fd;
    else
      ::close(fd);
  }
  if (listener >= 0) ::close(listener);
  // every rank starts its watch only if the whole ring formed
  const double formed = world.allreduce_scalar(to_successor_ >= 0 && from_predecessor_ >= 0 ? 1.0 : 0.0, ReduceOp::min);
  if (formed < 1) {
    if (rank_ == 0)
      log::info("warning: the ranks could not reach each other for the heartbeat: a dead or stopped rank will be found "
                "only by --comm-timeout");
    if (to_successor_ >= 0) ::close(to_successor_);
    if (from_predecessor_ >= 0) ::close(from_predecessor_);
    to_successor_ = from_predecessor_ = -1;
    return;
  }
  ::fcntl(from_predecessor_, F_SETFL, ::fcntl(from_predecessor_, F_GETFL) | O_NONBLOCK);
  wake_ = ::eventfd(0, EFD_CLOEXEC);
  thread_ = std::thread([this] { run(); });
}

Heartbeat::~Heartbeat() {
  if (!thread_.joinable()) return;
  stop_ = true;
  // the thread waits in poll() for up to a quarter of a beat: wake it, or every run's exit waits
  // that long (0.25 s, a third of a small test's launch). Should the write fail, it stops on its own.
  const uint64_t one = 1;
  if (wake_ >= 0) (void)!::write(wake_, &one, sizeof one);
  thread_.join();
  send_all(to_successor_, &kGoodbye, 1);
  ::close(to_successor_);
  ::close(from_predecessor_);
  if (wake_ >= 0) ::close(wake_);
}

void Heartbeat::run() {
  // several beats per timeout, so that one late beat is not a dead rank
  const double interval_s = std::min(1.0, timeout_s_ / 5);
  const int poll_ms = std::max(10, static_cast<int>(interval_s * 1000 / 4));
  double last_sent = 0, last_heard = seconds_now();
  bool predecessor_done = false;  // it said goodbye: its silence from now on is expected
  while (!stop_) {
    const double now = seconds_now();
    if (now - last_sent >= interval_s) {
      // a successor that is gone shows as its own predecessor's failure: nothing to do here
      send_all(to_successor_, &kBeat, 1);
      last_sent = now;
    }
    // the predecessor's beats (none to wait for once it said goodbye) and the destructor's wake-up
    pollfd p[2] = {{predecessor_done ? -1 : from_predecessor_, POLLIN, 0}, {wake_, POLLIN, 0}};
    ::poll(p, 2, poll_ms);
    if (stop_) break;
    if (p[0].revents != 0) {
      char buf[64];
      const ssize_t n = ::recv(from_predecessor_, buf, sizeof buf, 0);
      if (n == 0) fail(fmt::format("rank {} exited without a word (killed?): its heartbeat connection closed", predecessor_));
      for (ssize_t i = 0; i < n; ++i) predecessor_done |= buf[i] == kGoodbye;
      if (n > 0) last_heard = seconds_now();
    }
    if (!predecessor_done && seconds_now() - last_heard > timeout_s_)
      fail(fmt::format("rank {} stopped answering: no heartbeat for {:.0f} s (stopped, hung in the kernel, or its host "
                       "is unreachable)",
                       predecessor_, seconds_now() - last_heard));
  }
}

void Heartbeat::fail(const std::string& what) {
  std::fprintf(stderr, "pipemoe: error: rank %d: %s; ending the job\n", rank_, what.c_str());
  std::fflush(stderr);
  // mpirun ends every other rank when one exits before MPI_Finalize
  std::_Exit(3);
}

}  // namespace pm
