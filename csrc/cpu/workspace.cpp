// The caching CPU allocator behind WorkspaceScope (workspace.h).
#include "cpu/workspace.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <iterator>
#include <list>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace pymeta {
namespace {

// Blocks come from c10's alloc_cpu, so that c10's free_cpu frees any of them: oneDNN takes memory
// through raw_allocate / raw_deallocate (raw_deleter() below), possibly across the scope's edges.
// Tensors free through their DataPtr's deleter, raw blocks through raw_deleter(); both are
// give_back, which caches a block it handed out under its size (oneDNN's scratch memory is half
// the blocks of a ResNet-12 meta-step). A raw block freed after the scope has ended goes to
// c10's free_cpu instead.
class WorkspaceAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < static_cast<size_t>(kWorkspaceMinBytes)) {  // not cached: freed as c10 frees it
      void* ptr = c10::alloc_cpu(n);
      return {ptr, ptr, &c10::free_cpu, c10::Device(c10::DeviceType::CPU)};
    }
    void* ptr = nullptr;
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = by_size_.find(n);
      if (it != by_size_.end() && !it->second.empty()) {  // the most recently freed of that size
        ptr = it->second.back()->ptr;
        order_.erase(it->second.back());
        it->second.pop_back();
        cached_ -= static_cast<int64_t>(n);
      } else {
        // A miss hands back cached blocks (least recently freed first) until cached plus live
        // bytes fit under the most the live blocks have ever reached: the cache then fills
        // only memory the process already held at its peak, and never raises the peak of
        // its own blocks.
        while (!order_.empty() && live_bytes_ + cached_ + static_cast<int64_t>(n) > peak_live_) {
          evicted.push_back(evict_oldest());
        }
      }
      live_bytes_ += static_cast<int64_t>(n);
      peak_live_ = std::max(peak_live_, live_bytes_);
    }
    for (void* p : evicted) c10::free_cpu(p);
    if (ptr == nullptr) ptr = c10::alloc_cpu(n);
    {
      // An entry may outlive its block (a raw block freed after the scope, by free_cpu); the
      // next block malloc hands out at that address overwrites it.
      std::lock_guard<std::mutex> lock(mutex_);
      auto [it, fresh] = live_.try_emplace(ptr, n);
      if (!fresh) {
        live_bytes_ -= static_cast<int64_t>(it->second);
        it->second = n;
      }
    }
    return {ptr, ptr, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &give_back; }

  void copy_data(void* dest, const void* src, size_t count) const override { std::memcpy(dest, src, count); }

  // Called by a freed tensor of a large block, whenever and wherever: back to the cache.
  static void give_back(void* ptr) { instance().put(ptr); }

  // Caches the block, evicting the least recently freed ones beyond the limit: a cached block
  // not reused soon only adds to the process's peak memory.
  void put(void* ptr) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = live_.find(ptr);
      if (it != live_.end()) live_bytes_ -= static_cast<int64_t>(it->second);
      const int64_t limit = limit_.load();
      if (it == live_.end() || static_cast<int64_t>(it->second) > limit) {
        if (it != live_.end()) live_.erase(it);
        evicted.push_back(ptr);
      } else {
        const size_t size = it->second;
        live_.erase(it);
        while (cached_ + static_cast<int64_t>(size) > limit) evicted.push_back(evict_oldest());
        order_.push_back({ptr, size});
        by_size_[size].push_back(std::prev(order_.end()));
        cached_ += static_cast<int64_t>(size);
      }
    }
    for (void* p : evicted) c10::free_cpu(p);
  }

  void release() {
    std::vector<void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (!order_.empty()) blocks.push_back(evict_oldest());
      peak_live_ = live_bytes_;  // the next workload sets its own peak
    }
    for (void* p : blocks) c10::free_cpu(p);
  }

  int64_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

  static WorkspaceAllocator& instance() {
    static auto* allocator = new WorkspaceAllocator();  // never destroyed: tensors may outlive exit
    return *allocator;
  }

  c10::Allocator* previous_ = nullptr;  // the allocator the first scope found in place
  std::atomic<int64_t> limit_{int64_t{64} << 20};

 private:
  struct Cached {
    void* ptr;
    size_t size;
  };
  using Position = std::list<Cached>::iterator;

  // Takes the least recently freed block out of the cache (mutex held) and returns it.
  void* evict_oldest() {
    const Cached oldest = order_.front();
    auto& same = by_size_[oldest.size];
    same.erase(same.begin());  // blocks of one size are cached in time order: this one is first
    order_.pop_front();
    cached_ -= static_cast<int64_t>(oldest.size);
    return oldest.ptr;
  }

  std::mutex mutex_;
  std::list<Cached> order_;  // cached blocks, least recently freed first
  std::unordered_map<size_t, std::vector<Position>> by_size_;
  std::unordered_map<void*, size_t> live_;  // sizes of the large blocks tensors hold
  int64_t cached_ = 0;
  int64_t live_bytes_ = 0;  // of the blocks in live_
  int64_t peak_live_ = 0;   // the most live_bytes_ has been
};

std::mutex scope_mutex;
int scopes = 0;
bool installed = false;

}  // namespace

WorkspaceScope::WorkspaceScope() {
  std::lock_guard<std::mutex> lock(scope_mutex);
  if (scopes++ > 0) return;
  WorkspaceAllocator& cache = WorkspaceAllocator::instance();
  cache.previous_ = c10::GetCPUAllocator();
  // Priority 0, c10's own: an allocator someone installed with a higher priority stays (then
  // the cache is simply not used).
  c10::SetCPUAllocator(&cache, 0);
  installed = c10::GetCPUAllocator() == &cache;
}

WorkspaceScope::~WorkspaceScope() {
  std::lock_guard<std::mutex> lock(scope_mutex);
  if (--scopes > 0 || !installed) return;
  c10::SetCPUAllocator(WorkspaceAllocator::instance().previous_, 0);
  installed = false;
}

int64_t workspace_cached_bytes() { return WorkspaceAllocator::instance().cached(); }
int64_t workspace_cache_limit() { return WorkspaceAllocator::instance().limit_.load(); }
void set_workspace_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "pymeta: workspace cache limit: expected bytes >= 0, received ", bytes);
  WorkspaceAllocator::instance().limit_.store(bytes);
  if (workspace_cached_bytes() > bytes) release_workspaces();
}
void release_workspaces() { WorkspaceAllocator::instance().release(); }

}  // namespace pymeta
