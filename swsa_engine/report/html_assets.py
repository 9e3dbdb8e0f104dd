"""The HTML report's style sheet and script, embedded in every page (no network needed).

The script sorts and filters the overview tables, draws Figure 3 as inline SVG from the
``fig3-data`` JSON, and builds a task's section from its ``task-<id>`` JSON when it is opened."""

from __future__ import annotations

__all__ = ["CSS", "JS"]

#: the page's styles
CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#243447;color:#fff;padding:10px 20px}header h1{margin:0;font-size:20px}header a{color:#cde}
main{padding:0 20px 40px}footer{padding:10px 20px;color:#666;font-size:12px}
h2{border-bottom:2px solid #243447;padding-bottom:2px}h3{margin-bottom:4px}
.cap{color:#555;font-size:13px;margin:2px 0 6px}.warn{background:#fff3cd;border:1px solid #e0c36c;padding:6px 10px}
.note{color:#444;font-size:13px}
table.data{border-collapse:collapse;font-size:13px;background:#fff}
table.data th,table.data td{border:1px solid #ddd;padding:3px 7px;text-align:left}
table.data th{background:#eef1f5;cursor:pointer;user-select:none;white-space:nowrap}
table.data th.asc:after{content:" ▲"}table.data th.desc:after{content:" ▼"}
table.data td.num{text-align:right;font-variant-numeric:tabular-nums}
table.data tr:nth-child(even) td{background:#f8f9fb}
.filters{display:flex;gap:14px;flex-wrap:wrap;margin:8px 0;padding:6px 10px;background:#eef1f5;border-radius:4px}
.filters label{font-size:13px}
.panels{display:flex;flex-wrap:wrap;gap:10px}.panel{background:#fff;border:1px solid #ddd}
.fig{max-width:100%;border:1px solid #ddd;background:#fff}
.task-layout{display:flex;gap:16px;align-items:flex-start}
#task-list{list-style:none;margin:0;padding:0;width:240px;max-height:80vh;overflow:auto;border:1px solid #ddd;background:#fff;flex:none}
#task-list li{padding:3px 8px;cursor:pointer;border-bottom:1px solid #eee}#task-list li:hover{background:#eef1f5}
#task-list li.active{background:#d6e4f5}#task-list .ds{color:#888;font-size:12px}
#task-view{flex:1;min-width:0}
.thumbs{display:flex;flex-wrap:wrap;gap:4px;margin:4px 0 10px}
.thumb{display:inline-flex;flex-direction:column;align-items:center;font-size:10px;color:#666}
.thumb img,.ph{width:var(--t);height:var(--t);object-fit:contain;image-rendering:pixelated;border:1px solid #ccc;background:#fff}
.ph{display:flex;align-items:center;justify-content:center;text-align:center;font-size:9px;color:#999;background:#f0f0f0}
.pair{display:inline-flex;align-items:center;gap:2px;border:1px solid #e3e3e3;padding:2px;background:#fff}
.pair .arrow{color:#999}
table.grid{border-collapse:collapse}table.grid td,table.grid th{padding:2px;font-size:10px;color:#666;font-weight:normal}
table.grid th.corner{text-align:right}
.gen{margin:6px 0 14px}.gen h5{margin:2px 0}
tr.swsa td{outline:none}.badge{display:inline-block;padding:0 5px;border-radius:3px;font-size:11px;margin-left:3px}
.b-swsa{background:#d9ecd9}table.picks{margin-top:8px}.nowrap{white-space:nowrap}.scroll{overflow-x:auto;max-width:100%}.b-oracle{background:#f3dfc1}
"""


#: the page's script
JS = r"""
(function(){
'use strict';
const $=(s,r)=>(r||document).querySelector(s), $$=(s,r)=>Array.from((r||document).querySelectorAll(s));
const data=id=>JSON.parse(document.getElementById(id).textContent);
const esc=s=>String(s).replace(/[&<>"']/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
const meta=data('meta');
document.documentElement.style.setProperty('--t', meta.thumb_size+'px');

// ---- sortable tables
$$('table.data').forEach(table=>{
  $$('th',table).forEach((th,col)=>th.addEventListener('click',()=>{
    const asc=!th.classList.contains('asc');
    $$('th',table).forEach(h=>h.classList.remove('asc','desc'));
    th.classList.add(asc?'asc':'desc');
    const body=table.tBodies[0], rows=Array.from(body.rows);
    const key=r=>r.cells[col].dataset.v;
    const numeric=rows.every(r=>key(r)===''||!isNaN(parseFloat(key(r))));
    rows.sort((a,b)=>{
      let x=key(a),y=key(b);
      if(numeric){x=x===''?-Infinity:parseFloat(x);y=y===''?-Infinity:parseFloat(y);return asc?x-y:y-x;}
      return asc?x.localeCompare(y):y.localeCompare(x);
    });
    rows.forEach(r=>body.appendChild(r));
  }));
});

// ---- filters by dataset, setting, source, strategy
const FILTERS=['dataset','setting','source','strategy'], chosen={};
const filterBox=$('#filters');
FILTERS.forEach(name=>{
  const values=new Set();
  $$('table.data').forEach(t=>{
    const col=$$('th',t).findIndex(th=>th.dataset.col===name);
    if(col<0)return;
    Array.from(t.tBodies[0].rows).forEach(r=>values.add(r.cells[col].dataset.v));
  });
  if(!values.size)return;
  const label=document.createElement('label');
  label.innerHTML=esc(name)+' <select data-filter="'+esc(name)+'"><option value="">all</option>'+
    Array.from(values).sort().map(v=>'<option>'+esc(v)+'</option>').join('')+'</select>';
  filterBox.appendChild(label);
});
filterBox.addEventListener('change',e=>{
  const sel=e.target; if(!sel.dataset.filter)return;
  chosen[sel.dataset.filter]=sel.value; applyFilters();
});
function applyFilters(){
  $$('table.data').forEach(t=>{
    const cols={}; $$('th',t).forEach((th,i)=>cols[th.dataset.col]=i);
    Array.from(t.tBodies[0].rows).forEach(r=>{
      r.hidden=!Object.entries(chosen).every(([k,v])=>!v||!(k in cols)||r.cells[cols[k]].dataset.v===v);
    });
  });
  drawFigure3();
}

// ---- Figure 3 as inline SVG
const fig3=data('fig3-data'), srcSel=$('#fig3-source');
fig3.sources.forEach(s=>{const o=document.createElement('option');o.textContent=s;srcSel.appendChild(o);});
srcSel.addEventListener('change',drawFigure3);
function scatter(xs,ys,labels,title,w,h){
  const pts=[];xs.forEach((x,i)=>{if(x!==null&&ys[i]!==null)pts.push([x,ys[i],labels[i]]);});
  let lo=1,hi=0;pts.forEach(p=>{lo=Math.min(lo,p[0],p[1]);hi=Math.max(hi,p[0],p[1]);});
  if(!pts.length){lo=0;hi=1;}
  const pad=Math.max(0.02,0.08*(hi-lo));lo-=pad;hi+=pad;
  const m=36,X=v=>m+(v-lo)/(hi-lo)*(w-m-10),Y=v=>h-m+10-(v-lo)/(hi-lo)*(h-m-10);
  let s='<svg xmlns="http://www.w3.org/2000/svg" class="panel" width="'+w+'" height="'+h+'" viewBox="0 0 '+w+' '+h+'">';
  s+='<text x="'+(w/2)+'" y="13" font-size="11" text-anchor="middle">'+esc(title)+'</text>';
  s+='<line x1="'+X(lo)+'" y1="'+Y(lo)+'" x2="'+X(hi)+'" y2="'+Y(hi)+'" stroke="#999" stroke-dasharray="4 3"/>';
  s+='<rect x="'+m+'" y="20" width="'+(w-m-10)+'" height="'+(h-m-10)+'" fill="none" stroke="#ccc"/>';
  [lo,(lo+hi)/2,hi].forEach(v=>{s+='<text x="'+X(v)+'" y="'+(h-m+22)+'" font-size="9" text-anchor="middle">'+v.toFixed(2)+'</text>'+
    '<text x="'+(m-3)+'" y="'+(Y(v)+3)+'" font-size="9" text-anchor="end">'+v.toFixed(2)+'</text>';});
  s+='<text x="'+(w/2)+'" y="'+(h-4)+'" font-size="10" text-anchor="middle">synthetic AUROC</text>';
  s+='<text transform="translate(10 '+(h/2)+') rotate(-90)" font-size="10" text-anchor="middle">real AUROC</text>';
  pts.forEach(p=>{s+='<circle cx="'+X(p[0])+'" cy="'+Y(p[1])+'" r="4" fill="#3b75af" stroke="#123"><title>'+esc(p[2])+
    ': synthetic '+p[0].toFixed(3)+', real '+p[1].toFixed(3)+'</title></circle><text x="'+(X(p[0])+5)+'" y="'+(Y(p[1])-4)+
    '" font-size="9">'+esc(p[2])+'</text>';});
  return s+'</svg>';
}
function drawFigure3(){
  const src=srcSel.value||fig3.sources[0];
  $('#fig3').innerHTML=fig3.panels.filter(p=>(!chosen.dataset||p.dataset===chosen.dataset)&&(!chosen.setting||p.setting===chosen.setting))
    .map(p=>scatter(p.synthetic[src]||[],p.real,fig3.candidates,p.dataset+' · '+p.setting+' · '+src,300,260)).join('');
}
drawFigure3();

// ---- tasks: index, search, sections built on demand
const index=data('task-index'), list=$('#task-list'), search=$('#task-search');
list.innerHTML=index.map(t=>'<li data-id="'+t.id+'" data-cls="'+esc(t.cls.toLowerCase())+'" data-ds="'+esc(t.dataset.toLowerCase())+
  '">'+esc(t.cls)+' <span class="ds">'+esc(t.dataset)+(t.status!=='ok'?' · '+esc(t.status):'')+'</span></li>').join('');
function filterTasks(){
  const q=search.value.trim().toLowerCase(); let n=0;
  Array.from(list.children).forEach(li=>{const hit=!q||li.dataset.cls.includes(q)||li.dataset.ds.includes(q);li.hidden=!hit;n+=hit;});
  $('#task-count').textContent=n+' of '+index.length+' tasks';
}
search.addEventListener('input',filterTasks); filterTasks();
list.addEventListener('click',e=>{const li=e.target.closest('li');if(li)openTask(li.dataset.id);});
function img(task,id,cls,caption){
  const uri=task.thumbs[String(id)];
  const inner=uri?'<img alt="image '+id+'" title="image '+id+'" src="'+uri+'">':'<div class="ph" title="image '+id+'">no image file</div>';
  return '<span class="thumb '+(cls||'')+'" data-id="'+id+'">'+inner+(caption!==undefined?'<span>'+esc(caption)+'</span>':'')+'</span>';
}
function generatorHtml(task,g){
  let s='<div class="gen" data-source="'+esc(g.source)+'"><h5>'+esc(g.source)+' — '+g.items.length+
    (g.total>g.items.length?' of '+g.total:'')+' synthetic images</h5>';
  if(g.layout==='diffusion'){
    const styles=[...new Set(g.items.map(i=>i.style))], contents=[...new Set(g.items.map(i=>i.content))];
    const at={};g.items.forEach(i=>at[i.style+'/'+i.content]=i);
    s+='<table class="grid"><tr><th class="corner">content ↓ · style →</th>'+styles.map(st=>'<th>'+img(task,st,'style')+'</th>').join('')+'</tr>';
    contents.forEach(c=>{s+='<tr><th>'+img(task,c,'content')+'</th>'+styles.map(st=>{const i=at[st+'/'+c];
      return '<td>'+(i?img(task,i.id,'synth'):'')+'</td>';}).join('')+'</tr>';});
    s+='</table>';
  }else if(g.layout==='pairs'){
    s+='<div class="thumbs">'+g.items.map(i=>'<span class="pair">'+i.parents.map(p=>img(task,p,'parent')).join('')+
      '<span class="arrow">→</span>'+img(task,i.id,'synth')+'</span>').join('')+'</div>';
  }else{
    s+='<div class="thumbs">'+g.items.map(i=>img(task,i.id,'synth')).join('')+'</div>';
  }
  return s+'</div>';
}
function aurocHtml(task){
  const a=task.auroc; if(!a)return '<p>No AUROCs: '+esc(task.reason||task.status)+'</p>';
  const picks={};task.picks.forEach(p=>picks[p.setting]=p);
  let s='<div class="scroll"><table class="data auroc"><thead><tr><th>candidate</th><th>picked by</th>'+Object.keys(a.synthetic).map(k=>'<th>synthetic · '+esc(k)+'</th>').join('')+
    Object.keys(a.real).map(k=>'<th>real · '+esc(k)+'</th>').join('')+'<th>closest class</th></tr></thead><tbody>';
  a.candidates.forEach((c,i)=>{
    let badges='';Object.values(picks).forEach(p=>{if(p.swsa===c)badges+='<span class="badge b-swsa" title="SWSA pick ('+esc(p.setting)+')">SWSA '+esc(p.setting)+'</span>';
      if(p.oracle===c)badges+='<span class="badge b-oracle" title="oracle pick ('+esc(p.setting)+')">oracle '+esc(p.setting)+'</span>';});
    s+='<tr><td>'+esc(c)+'</td><td class="nowrap">'+(badges||'–')+'</td>'+Object.values(a.synthetic).map(v=>'<td class="num">'+v[i]+'</td>').join('')+
      Object.values(a.real).map(v=>'<td class="num">'+v[i]+'</td>').join('')+'<td>'+esc(a.closest[i])+'</td></tr>';
  });
  s+='</tbody></table></div>';
  if(task.picks.length){
    s+='<table class="data picks"><thead><tr><th>setting</th><th>source</th><th>SWSA pick</th><th>its synthetic AUROC</th>'+
      '<th title="share of bootstrap resamples of the synthetic validation set in which it is picked again">resample probability</th>'+
      '<th title="share of the other synthetic sources that pick it too">source agreement</th><th title="its synthetic AUROC minus the runner-up\'s">margin</th>'+
      '<th>its real AUROC</th><th>oracle pick</th><th>best real AUROC</th><th>hit</th></tr></thead><tbody>'+task.picks.map(p=>'<tr><td>'+esc(p.setting)+'</td><td>'+esc(p.source)+
      '</td><td>'+esc(p.swsa)+'</td><td class="num">'+p.swsa_synth+'</td><td class="num">'+esc(p.resample||'–')+'</td><td class="num">'+esc(p.agreement||'–')+
      '</td><td class="num">'+esc(p.margin||'–')+'</td><td class="num">'+p.swsa_real+'</td><td>'+esc(p.oracle)+
      '</td><td class="num">'+p.oracle_real+'</td><td>'+(p.hit?'yes':'no')+'</td></tr>').join('')+'</tbody></table>';
  }
  if((task.confidence||[]).length){
    const settings=Object.keys(task.confidence[0].regret);
    s+='<h5>How much to trust each pick (label-free)</h5><table class="data confidence"><thead><tr><th>strategy</th><th>pick</th>'+
      '<th>resample probability</th><th>source agreement</th><th>margin</th>'+settings.map(k=>'<th>regret · '+esc(k)+'</th>').join('')+
      '</tr></thead><tbody>'+task.confidence.map(c=>'<tr><td>'+esc(c.strategy)+'</td><td>'+esc(c.pick||'–')+'</td><td class="num">'+esc(c.resample)+
      '</td><td class="num">'+esc(c.agreement)+'</td><td class="num">'+esc(c.margin)+'</td>'+settings.map(k=>'<td class="num">'+esc(c.regret[k]||'–')+'</td>').join('')+
      '</tr>').join('')+'</tbody></table>';
  }
  const r=task.recommendation;
  if(r){
    const settings=Object.keys(r.regret);
    s+='<h5>The recommendation and why</h5><p class="rec"><b>'+esc(r.choice||'no pick')+'</b>'+(r.runs&&r.runs!==r.choice?': '+esc(r.runs):'')+
      (r.members?' ('+esc(r.members)+' members'+(r.member_weights?': '+esc(r.member_weights):'')+')':'')+'. '+esc(r.reason)+'</p>'+
      '<table class="data recommendation"><thead><tr><th>single pick</th><th title="share of bootstrap resamples of the synthetic set in which it beats ensemble(mean)">P(single &gt; mean)</th>'+
      '<th>P(selected &gt; mean)</th><th>bar</th><th>resamples</th><th>synthetic AUROC · single</th><th>· ensemble(mean)</th><th>· ensemble(selected)</th>'+
      settings.map(k=>'<th>real AUROC · '+esc(k)+'</th><th>regret · '+esc(k)+'</th>').join('')+'</tr></thead><tbody><tr><td>'+esc(r.single||'–')+
      '</td><td class="num">'+esc(r.p_single)+'</td><td class="num">'+esc(r.p_selected)+'</td><td class="num">'+esc(r.threshold)+'</td><td class="num">'+esc(r.n_resamples)+'</td>'+
      r.synthetic.map(v=>'<td class="num">'+esc(v)+'</td>').join('')+settings.map(k=>'<td class="num">'+esc(r.real[k])+'</td><td class="num">'+esc(r.regret[k])+'</td>').join('')+
      '</tr></tbody></table>';
  }
  return s;
}
function openTask(id){
  const el=document.getElementById('task-'+id); if(!el)return;
  const task=JSON.parse(el.textContent);
  $$('#task-list li').forEach(li=>li.classList.toggle('active',li.dataset.id===String(id)));
  let s='<article class="task" data-task="'+task.id+'"><h3>'+esc(task.cls)+' <span class="cap">'+esc(task.dataset)+' · task '+task.id+
    (task.status!=='ok'?' · '+esc(task.status)+': '+esc(task.reason||''):'')+'</span></h3>';
  s+='<h4>Seed images ('+task.seeds.length+')</h4><div class="thumbs seeds">'+task.seeds.map(i=>img(task,i,'seed')).join('')+'</div>';
  s+='<h4>Synthetic anomalies</h4>'+(task.generators.length?task.generators.map(g=>generatorHtml(task,g)).join(''):'<p>none</p>');
  s+='<h4>Real validation images (a sample)</h4><h5>normal</h5><div class="thumbs real-normal">'+task.normals.map(i=>img(task,i,'real')).join('')+
    '</div><h5>anomalous</h5><div class="thumbs real-anomaly">'+task.anomalies.map(a=>img(task,a[0],'real',a[1])).join('')+'</div>';
  s+='<h4>Candidates: synthetic vs real AUROC</h4>'+aurocHtml(task);
  if(task.tsne&&$('#figure4'))s+='<h4>t-SNE (Figure 4; this task is one of its panels)</h4><img class="fig" alt="figure 4" src="'+$('#figure4').src+'">';
  s+='<h4>Recorded skips</h4>'+(task.skips.length?'<table class="data"><thead><tr><th>stage</th><th>image</th><th>candidate</th><th>reason</th></tr></thead><tbody>'+
    task.skips.map(r=>'<tr>'+r.map(v=>'<td>'+esc(v)+'</td>').join('')+'</tr>').join('')+'</tbody></table>':'<p>none</p>');
  $('#task-view').innerHTML=s+'</article>';
  try{if(location.hash!=='#task-'+id)history.replaceState(null,'','#task-'+id);}catch(err){}
}
const m=location.hash.match(/^#task-(\d+)$/); if(m)openTask(m[1]);
document.body.dataset.ready='1';
})();
"""
